"""DAMM diffusion training throughput: batched DAMMP gating vs the official per-sample procedure.

For the demo and the paper-scale denoiser, one divergence-aware training step (forward, backward, AdamW) on
16x16 latents, at batch 8, 16 and 32, in fp32 and bf16 autocast. Reports samples/s, achieved GFLOP/s (FLOPs
counted with ``torch.utils.flop_counter``) as a fraction of this machine's measured matmul peak, and the peak
memory of a step. Run alone with ``python -m benchmarks.damm_training [--quick]``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.damm_network import _inputs, _model
from benchmarks.hardware import matmul_peak_gflops
from benchmarks.memory import peak_memory_mb
from benchmarks.timing import figure, time_call
from damm.losses import DAMMLoss, per_sample_reference_loss
from damm.networks import DEMO_DENOISER_CONFIG, PAPER_DENOISER_CONFIG, DAMMDenoiser

__all__ = ["NAME", "run"]

NAME = "damm_training"

#: Official DAMM code, paper configuration, fp32, these 2 cores: seconds per divergence-aware step at batch 16.
OFFICIAL_STEP_S_BATCH16 = 5.67

_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)


def _step_fn(model: DAMMDenoiser, batch: int, precision: str, per_sample: bool) -> Any:
    x, t = _inputs(model, batch)
    noise = torch.randn(batch, model.latent_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    loss_fn = DAMMLoss(gamma=model.gamma)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(precision):
            if per_sample:
                loss = per_sample_reference_loss(model, x, t, noise, loss_fn, divergence_aware=True)
            else:
                loss, _ = loss_fn(model.forward_all(x, t), noise.float(), divergence_aware=True)
        loss.float().backward()
        opt.step()

    return step


def _train_flops(model: DAMMDenoiser, batch: int) -> float:
    x, t = _inputs(model, batch)
    noise = torch.randn(batch, model.latent_channels, 16, 16)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = DAMMLoss(gamma=model.gamma)(model.forward_all(x, t), noise, divergence_aware=True)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run(quick: bool = False) -> list[dict]:
    """Measure the figures.

    Args:
        quick: demo config only, batch 8, fp32 and bf16, fewer repeats.

    Returns:
        Figure records.
    """
    figs: list[dict] = []
    peaks = {p: matmul_peak_gflops(torch.float32 if p == "fp32" else torch.bfloat16) for p in _DTYPES}
    for p, v in peaks.items():
        figs.append(figure(f"matmul peak {p}", v, "GFLOP/s", dtype=p))
    configs = (
        {"demo": DEMO_DENOISER_CONFIG} if quick else {"demo": DEMO_DENOISER_CONFIG, "paper": PAPER_DENOISER_CONFIG}
    )
    batches = (8,) if quick else (8, 16, 32)
    repeat = 2 if quick else 3
    for label, config in configs.items():
        model = _model(config).train()
        flops_per_sample = _train_flops(model, 2) / 2
        figs.append(figure(f"{label}: training-step FLOPs per sample (fwd+bwd)", flops_per_sample / 1e9, "GFLOP"))
        for precision in _DTYPES:
            for batch in batches:
                batched = _step_fn(model, batch, precision, per_sample=False)
                med, spread = time_call(batched, warmup=1, repeat=repeat)
                achieved = flops_per_sample * batch / med / 1e9
                ref: dict[str, Any] = {}
                if label == "paper" and batch == 16 and precision == "fp32":
                    ref = {"reference": OFFICIAL_STEP_S_BATCH16, "reference_label": "official code, fp32, 2 cores"}
                figs.append(
                    figure(
                        f"{label} {precision} b{batch}: divergence-aware step (batched DAMMP)",
                        med,
                        "s",
                        spread=spread,
                        **ref,
                        batch=batch,
                    )
                )
                figs.append(
                    figure(
                        f"{label} {precision} b{batch}: training samples/s (batched DAMMP)",
                        batch / med,
                        "samples/s",
                        plot={
                            "id": f"DAMM training throughput ({label})",
                            "x": batch,
                            "series": f"batched {precision}",
                            "xlabel": "batch",
                            "ylabel": "samples/s",
                        },
                    )
                )
                figs.append(
                    figure(
                        f"{label} {precision} b{batch}: achieved GFLOP/s as % of {precision} matmul peak",
                        100 * achieved / peaks[precision],
                        "%",
                        achieved_gflops=round(achieved, 1),
                        peak_gflops=round(peaks[precision], 1),
                    )
                )
                if precision == "fp32":
                    ref_step = _step_fn(model, batch, precision, per_sample=True)
                    med_r, _ = time_call(ref_step, warmup=1, repeat=max(1, repeat - 1))
                    figs.append(
                        figure(
                            f"{label} {precision} b{batch}: training samples/s (per-sample loop, official procedure)",
                            batch / med_r,
                            "samples/s",
                            plot={
                                "id": f"DAMM training throughput ({label})",
                                "x": batch,
                                "series": "per-sample loop fp32",
                                "xlabel": "batch",
                                "ylabel": "samples/s",
                            },
                        )
                    )
                    figs.append(figure(f"{label} b{batch}: speed-up batched / per-sample loop", med_r / med, "x"))
                if batch == batches[-1] or batch == 16:
                    mem = peak_memory_mb(_step_fn(model, batch, precision, per_sample=False))
                    figs.append(figure(f"{label} {precision} b{batch}: peak memory of a training step", mem, "MiB"))
        if label == "paper":
            med16 = next(
                f["value"] for f in figs if f["name"] == "paper fp32 b16: divergence-aware step (batched DAMMP)"
            )
            figs.append(
                figure(
                    "paper fp32 b16: training throughput vs the official code",
                    OFFICIAL_STEP_S_BATCH16 / med16,
                    "x",
                    reference=5.0,
                    reference_label="target of issue 9 (>= 5x the official throughput)",
                )
            )
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

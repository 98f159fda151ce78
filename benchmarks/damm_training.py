"""DAMM diffusion training throughput: batched DAMMP gating vs the official per-sample procedure (fp32).

For the demo and the paper-scale denoiser, one divergence-aware training step (forward, backward, AdamW) on
16x16 latents at batch 8, 16 and 32 in fp32: samples/s of the batched DAMMP gating and of the official per-sample
loop, achieved GFLOP/s (FLOPs counted with ``torch.utils.flop_counter``) as a fraction of this machine's measured
fp32 matmul peak, and the peak memory of a step. The fp32-vs-bf16 and channels-last comparison of the same step
lives in ``benchmarks.precision``, which builds its steps with :func:`make_train_step` from here.
Run alone with ``python -m benchmarks.damm_training [--quick]``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.damm_network import _inputs, make_denoiser
from benchmarks.hardware import matmul_peak_gflops
from benchmarks.memory import peak_memory_mb
from benchmarks.official import official
from benchmarks.timing import figure, time_call
from damm.losses import DAMMLoss, per_sample_reference_loss
from damm.networks import DEMO_DENOISER_CONFIG, PAPER_DENOISER_CONFIG, DAMMDenoiser
from ddcore.device import module_device
from ddcore.precision import autocast, check_precision

__all__ = ["NAME", "make_train_step", "run", "train_step_flops"]

NAME = "damm_training"


def make_train_step(
    model: DAMMDenoiser,
    batch: int,
    precision: str = "fp32",
    per_sample: bool = False,
    channels_last: bool = False,
    size: int = 16,
    fused_optimizer: bool = False,
) -> Callable[[], None]:
    """One divergence-aware training step (forward, DAMM loss, backward, AdamW) on fixed random inputs.

    As in ``damm.engines.DAMMDiffusionTrainer``, the forward pass runs under ``ddcore.precision.autocast`` and the
    loss outside it (the per-sample procedure interleaves both under autocast); weights, gradients and the optimizer
    stay fp32.

    Args:
        model: the denoiser (in train mode); with ``channels_last`` it must already be in channels-last format
            (``model.to(memory_format=torch.channels_last)``).
        batch: samples per step.
        precision: ``"fp32"`` or ``"bf16"`` (``"fp16"`` on CUDA).
        per_sample: the official procedure (one forward per sample for the gating) instead of batched DAMMP.
        channels_last: give the inputs the channels-last memory format (2D latents only).
        size: latent edge.
        fused_optimizer: AdamW's fused kernel (the bundle's ``fused_optimizer``) instead of its per-tensor loop.

    Returns:
        A zero-argument callable running one step.
    """
    device = module_device(model)
    precision = check_precision(precision, device)
    x, t = _inputs(model, batch, size)
    noise = torch.randn((batch, model.latent_channels, *x.shape[2:]), generator=torch.Generator().manual_seed(1))
    x, t, noise = x.to(device), t.to(device), noise.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        noise = noise.contiguous(memory_format=torch.channels_last)
    loss_fn = DAMMLoss(gamma=model.gamma)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_optimizer or None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if per_sample:  # forward and loss interleaved per sample
            with autocast(precision, device):
                loss = per_sample_reference_loss(model, x, t, noise, loss_fn, divergence_aware=True)
        else:
            with autocast(precision, device):
                output = model.forward_all(x, t)
            loss, _ = loss_fn(output, noise, divergence_aware=True)
        loss.float().backward()
        opt.step()

    return step


def train_step_flops(model: DAMMDenoiser, batch: int = 2, size: int = 16) -> float:
    """FLOPs of one batched training step's forward and backward (not the optimizer), per sample.

    Args:
        model: the denoiser.
        batch: batch used for counting (FLOPs scale linearly with it).
        size: latent edge.

    Returns:
        FLOPs per sample (``torch.utils.flop_counter``, fp32; the count is the same in any precision).
    """
    device = module_device(model)
    x, t = _inputs(model, batch, size)
    noise = torch.randn((batch, model.latent_channels, *x.shape[2:]))
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = DAMMLoss(gamma=model.gamma)(
            model.forward_all(x.to(device), t.to(device)), noise.to(device), divergence_aware=True
        )
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) / batch


def run(quick: bool = False) -> list[dict]:
    """Measure the figures.

    Args:
        quick: demo config only, batch 8, fewer repeats, one thread.

    Returns:
        Figure records.
    """
    torch.set_num_threads(1 if quick else max(1, min(2, torch.get_num_threads())))
    threads = torch.get_num_threads()
    peak = matmul_peak_gflops(torch.float32)
    figs: list[dict] = [figure("matmul peak fp32", peak, "GFLOP/s", dtype="fp32", threads=threads)]
    configs = (
        {"demo": DEMO_DENOISER_CONFIG} if quick else {"demo": DEMO_DENOISER_CONFIG, "paper": PAPER_DENOISER_CONFIG}
    )
    batches = (8,) if quick else (8, 16, 32)
    repeat = 2 if quick else 3
    for label, config in configs.items():
        model = make_denoiser(config).train()
        flops_per_sample = train_step_flops(model)
        common = {"precision": "fp32", "config": label, "channels_last": False, "threads": threads, "quick": quick}
        figs.append(
            figure(f"{label}: training-step FLOPs per sample (fwd+bwd)", flops_per_sample / 1e9, "GFLOP", **common)
        )
        for batch in batches:
            p = {**common, "batch": batch}
            med, spread = time_call(make_train_step(model, batch), warmup=1, repeat=repeat)
            achieved = flops_per_sample * batch / med / 1e9
            ref: dict[str, Any] = {}
            if label == "paper" and batch == 16:
                value, text = official("damm_train_step_s_b16")
                ref = {"reference": value, "reference_label": text}
            figs.append(
                figure(f"{label} fp32 b{batch}: divergence-aware step (batched DAMMP)", med, "s", spread, **ref, **p)
            )
            figs.append(
                figure(
                    f"{label} fp32 b{batch}: training samples/s (batched DAMMP)",
                    batch / med,
                    "samples/s",
                    **p,
                    plot={
                        "id": f"DAMM training throughput ({label})",
                        "x": batch,
                        "series": "batched DAMMP fp32",
                        "xlabel": "batch",
                        "ylabel": "samples/s",
                    },
                )
            )
            figs.append(
                figure(
                    f"{label} fp32 b{batch}: achieved GFLOP/s as % of fp32 matmul peak",
                    100 * achieved / peak,
                    "%",
                    achieved_gflops=round(achieved, 1),
                    peak_gflops=round(peak, 1),
                    **p,
                )
            )
            med_r, _ = time_call(make_train_step(model, batch, per_sample=True), warmup=1, repeat=max(1, repeat - 1))
            figs.append(
                figure(
                    f"{label} fp32 b{batch}: training samples/s (per-sample loop, official procedure)",
                    batch / med_r,
                    "samples/s",
                    **p,
                    plot={
                        "id": f"DAMM training throughput ({label})",
                        "x": batch,
                        "series": "per-sample loop fp32 (official procedure)",
                        "xlabel": "batch",
                        "ylabel": "samples/s",
                    },
                )
            )
            figs.append(figure(f"{label} b{batch}: speed-up batched / per-sample loop", med_r / med, "x", **p))
            if batch == batches[-1] or batch == 16:
                mem = peak_memory_mb(make_train_step(model, batch))
                figs.append(figure(f"{label} fp32 b{batch}: peak memory of a training step", mem, "MiB", **p))
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

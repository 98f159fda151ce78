"""DAMM denoiser benchmark: parameter count, CPU forward time per sample, FLOPs, batched vs per-sample DAMMP.

Run: ``python -m benchmarks.damm_network`` (full) or ``python -m benchmarks.damm_network --quick``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.hardware import matmul_peak_gflops
from benchmarks.timing import figure, time_call
from damm.losses import DAMMLoss, per_sample_reference_loss
from damm.networks import (
    DEMO_DENOISER_CONFIG,
    PAPER_DENOISER_CONFIG,
    DAMMDenoiser,
    build_autoencoder,
    count_parameters,
    reference_forward_all,
)

__all__ = ["NAME", "autoencoder_figures", "make_denoiser", "run"]

NAME = "damm_network"

#: Official UNet_DAMM parameters in use (spec damm.md §2.9: 112,770,385 minus the unused 1,312,768 time embedder).
OFFICIAL_USED_PARAMS = 111_457_617
#: Official UNet_DAMM forward cost per sample at a 16x16 latent (spec damm.md §2.9, FLOPs = 2 x MACs).
OFFICIAL_GFLOPS = 6.67
#: Official VQ-GAN cost per 256x256 image (spec damm.md §2.9).
OFFICIAL_AE_GFLOPS = {"encode": 35.9, "decode": 59.3}

#: Autoencoders timed for encode/decode: the bundle default (train.json ``ae_*``) and a paper-like VQ autoencoder
#: (16x downsampling, 8 latent channels, 3 x 256 x 256 RGB input; spec damm.md §2.1).
AE_CASES: dict[str, dict[str, Any]] = {
    "demo": {
        "build": {
            "kind": "kl",
            "channels": (16, 32, 32),
            "latent_channels": 4,
            "num_res_blocks": 1,
            "norm_num_groups": 8,
        },
        "input": (1, 64, 64),
        "batch": 16,
    },
    "paper": {
        "build": {
            "kind": "vq",
            "in_channels": 3,
            "channels": (64, 128, 256, 256, 512),
            "latent_channels": 8,
            "num_res_blocks": 1,
            "norm_num_groups": 32,
        },
        "input": (3, 256, 256),
        "batch": 4,
    },
}


def _inputs(model: DAMMDenoiser, batch: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, model.in_channels) + (size,) * model.spatial_dims, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def make_denoiser(config: dict[str, Any]) -> DAMMDenoiser:
    torch.manual_seed(0)
    model = DAMMDenoiser(**config).eval()
    for head in (model.uni.out[-1], model.multi.out[-1]):  # non-zero heads so the branches differ
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return model


def _flops(model: DAMMDenoiser, x: torch.Tensor, t: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.forward_all(x, t)
    return float(counter.get_total_flops())


def _count_flops(fn: Any) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return float(counter.get_total_flops())


def autoencoder_figures(quick: bool, repeat: int, peak_fp32: float) -> list[dict]:
    """Encode and decode time, FLOPs and achieved GFLOP/s (as % of the fp32 matmul peak) of the autoencoders.

    Args:
        quick: only the demo autoencoder.
        repeat: timed repeats.
        peak_fp32: measured fp32 matmul peak in GFLOP/s.

    Returns:
        Figure records.
    """
    figs: list[dict] = []
    for label, case in AE_CASES.items():
        if quick and label == "paper":
            continue
        torch.manual_seed(0)
        ae = build_autoencoder(**case["build"]).eval()
        batch = case["batch"]
        x = torch.randn(batch, *case["input"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            z = ae.encode(x)
        calls = {"encode": lambda ae=ae, x=x: ae.encode(x), "decode": lambda ae=ae, z=z: ae.decode(z)}
        for op, fn in calls.items():
            gflop = _count_flops(fn) / 1e9

            def timed(fn: Any = fn) -> None:
                with torch.no_grad():
                    fn()

            med, spread = time_call(timed, warmup=1, repeat=repeat)
            achieved = gflop / med
            params = {
                "config": label,
                "kind": case["build"]["kind"],
                "input": list(case["input"]),
                "batch": batch,
                "threads": torch.get_num_threads(),
                "precision": "fp32",
            }
            per_image = {}
            if label == "paper":
                per_image = {
                    "reference": OFFICIAL_AE_GFLOPS[op],
                    "reference_label": f"official VQ-GAN {op} per 256^2 image (spec damm.md §2.9)",
                }
            figs.append(
                figure(
                    f"damm autoencoder {op} FLOPs per image ({label})", gflop / batch, "GFLOP", **per_image, **params
                )
            )
            figs.append(
                figure(
                    f"damm autoencoder {op} time per image ({label}, batch {batch})",
                    med / batch * 1e3,
                    "ms",
                    spread=spread / batch * 1e3,
                    **params,
                )
            )
            figs.append(
                figure(
                    f"damm autoencoder {op} achieved GFLOP/s as % of fp32 matmul peak ({label})",
                    100.0 * achieved / peak_fp32,
                    "%",
                    achieved_gflops=achieved,
                    peak_gflops=peak_fp32,
                    **params,
                    plot={
                        "id": "Achieved vs peak GFLOP/s (fp32, % of matmul peak)",
                        "x": f"AE {op} {label}",
                        "series": "autoencoder",
                        "xlabel": "workload",
                        "ylabel": "% of fp32 matmul peak",
                        "kind": "bar",
                        "hline": 100.0,
                    },
                )
            )
    return figs


def run(quick: bool = False) -> list[dict]:
    """Measure the figures.

    Args:
        quick: fewer repeats and no paper-scale batch-16 timing (finishes in well under a minute).

    Returns:
        Figure records (see ``benchmarks.timing.figure``).
    """
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    figs: list[dict] = []
    repeat = 2 if quick else 5
    peak_fp32 = matmul_peak_gflops(torch.float32, n=1024 if quick else 2048, repeat=3 if quick else 5)
    figs.append(figure("matmul peak fp32 (same run)", peak_fp32, "GFLOP/s", threads=torch.get_num_threads()))
    figs += autoencoder_figures(quick, repeat, peak_fp32)

    with torch.device("meta"):
        paper_meta = DAMMDenoiser(**PAPER_DENOISER_CONFIG)
    n_paper = count_parameters(paper_meta)
    figs.append(
        figure(
            "damm denoiser parameters (paper-scale config)",
            n_paper / 1e6,
            "M",
            reference=OFFICIAL_USED_PARAMS / 1e6,
            reference_label="official UNet_DAMM parameters in use (spec damm.md §2.9)",
            config="PAPER_DENOISER_CONFIG",
        )
    )
    n_demo = count_parameters(DAMMDenoiser(**DEMO_DENOISER_CONFIG))
    figs.append(figure("damm denoiser parameters (demo config)", n_demo / 1e6, "M", config="DEMO_DENOISER_CONFIG"))

    for label, config in (("demo", DEMO_DENOISER_CONFIG), ("paper", PAPER_DENOISER_CONFIG)):
        model = make_denoiser(config)
        x1, t1 = _inputs(model, 1)
        gflops = _flops(model, x1, t1) / 1e9
        ref = {"reference": OFFICIAL_GFLOPS, "reference_label": "official UNet_DAMM, spec damm.md §2.9"}
        figs.append(
            figure(
                f"damm denoiser forward FLOPs per sample ({label}, 16x16 latent)",
                gflops,
                "GFLOP",
                **(ref if label == "paper" else {}),
                latent=[config["latent_channels"], 16, 16],
            )
        )
        batches = (1,) if (quick and label == "paper") else (1, 16)
        for batch in batches:
            x, t = _inputs(model, batch)

            def fwd(model: DAMMDenoiser = model, x: torch.Tensor = x, t: torch.Tensor = t) -> None:
                with torch.no_grad():
                    model.forward_all(x, t)

            med, spread = time_call(fwd, warmup=1, repeat=repeat)
            figs.append(
                figure(
                    f"damm denoiser CPU forward time per sample ({label}, batch {batch})",
                    med / batch * 1e3,
                    "ms",
                    spread=spread / batch * 1e3,
                    batch=batch,
                    threads=torch.get_num_threads(),
                    latent=[config["latent_channels"], 16, 16],
                )
            )

    # batched DAMMP (one forward for the batch) vs the official per-sample procedure, same weights
    model = make_denoiser(DEMO_DENOISER_CONFIG).train()
    batch = 16
    x, t = _inputs(model, batch)
    noise = torch.randn(batch, model.latent_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    conf = model.forward_all(x, t).confidence.detach()
    model.gamma = float(conf.median())
    loss_fn = DAMMLoss(gamma=model.gamma)
    with torch.no_grad():
        diff = (model.forward_all(x, t).eps - reference_forward_all(model, x, t).eps).abs().max()
    figs.append(
        figure(
            "damm batched vs per-sample gated eps, max abs difference (demo, batch 16)",
            float(diff),
            "abs",
            batch=batch,
        )
    )

    def batched_step() -> None:
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model.forward_all(x, t), noise, divergence_aware=True)
        loss.backward()

    def per_sample_step() -> None:
        model.zero_grad(set_to_none=True)
        per_sample_reference_loss(model, x, t, noise, loss_fn, divergence_aware=True).backward()

    med_b, spread_b = time_call(batched_step, warmup=1, repeat=repeat)
    med_r, _ = time_call(per_sample_step, warmup=1, repeat=repeat)
    figs.append(
        figure(
            "damm divergence-aware training step (forward+backward), batched (demo, batch 16)",
            med_b,
            "s",
            spread=spread_b,
            reference=med_r,
            reference_label="per-sample micro-batch loop as in the official code, same weights",
            batch=batch,
        )
    )
    figs.append(
        figure(
            "damm divergence-aware training step speed-up of batched DAMMP over the per-sample loop (demo)",
            med_r / med_b,
            "x",
            batch=batch,
        )
    )
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

"""DRDM forward process: time of one draw ``q_sample``, binary exponentiation vs the official sequential loop,
and peak memory of one 3D draw (issue §7).

The official references (the DeformDDPM forward, 3D 128³ at t = 79 and 2D 256² with B = 8, measured with the
official code on each machine kind) come from :mod:`benchmarks.official`.

Compositions resample the field with ``grid_sample``, whose CPU kernels parallelise over the batch only; the
``grid_sample ... one composition`` figures time one composition on the 64³ lattice with the plain call (one busy
core for B = 1) and with :func:`drdm.fields.grid_sample_all_threads` (what every warp and composition uses).

Precision (issue 9): the forward process is pure field composition (random velocities, ``grid_sample`` compositions,
resizing), an fp32 island whatever the ``precision`` setting. The ``... under bf16 autocast`` figures run the same
draw (same seed) inside ``torch.autocast(bfloat16)`` and report its time and its largest difference to the fp32 draw
(0 when the island holds).

Run: ``python -m benchmarks.drdm_forward [--quick]``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.memory import peak_memory_mb
from benchmarks.official import official
from benchmarks.timing import figure, time_call
from ddcore.precision import autocast
from drdm.diffusion import DeformationDiffusion
from drdm.fields import grid_sample_all_threads

__all__ = ["NAME", "run"]

NAME = "drdm_forward"


def run(quick: bool = False) -> list[dict]:
    """Measure forward-process timings (and, unless ``quick``, 3D peak memory).

    Args:
        quick: small subset (2D 256² and 3D 64³ at t = 79), well under a minute.

    Returns:
        Figures.
    """
    figures: list[dict] = []
    threads = torch.get_num_threads()
    cases = [((256, 256), 8, [79]), ((64, 64, 64), 1, [79])]
    if not quick:
        cases = [((256, 256), 8, [16, 48, 79]), ((64, 64, 64), 1, [16, 48, 79]), ((128, 128, 128), 1, [16, 48, 79])]
    for shape, batch, levels in cases:
        image = torch.rand(batch, 1, *shape)
        label = "x".join(str(s) for s in shape)
        for t in levels:
            for method in ("binary", "sequential"):
                diffusion = DeformationDiffusion(power_method=method)
                gen = torch.Generator().manual_seed(0)
                slow = method == "sequential" and len(shape) == 3
                median, spread = time_call(
                    lambda d=diffusion, g=gen, tt=t, im=image: d.q_sample(im, tt, g),
                    warmup=0 if slow else 1,
                    repeat=1 if (slow or quick) else 3,
                )
                ref, ref_label = None, None
                if shape == (128, 128, 128) and t == 79:
                    ref, ref_label = official("drdm_forward_3d_128_t79_s")
                if shape == (256, 256) and t == 79 and batch == 8:
                    ref, ref_label = official("drdm_forward_2d_256_b8_t79_s")
                n_cum, n_step = diffusion.step_counts(t)
                figures.append(
                    figure(
                        f"drdm forward {len(shape)}D {label} B={batch} t={t} ({method})",
                        median,
                        "s",
                        spread=spread,
                        reference=ref,
                        reference_label=ref_label,
                        shape=list(shape),
                        batch=batch,
                        t=t,
                        method=method,
                        compositions_cumulative=int(n_cum),
                        compositions_step=int(n_step),
                        threads=threads,
                        plot={
                            "id": "DRDM forward process time vs t",
                            "x": t,
                            "series": f"{label} {method}",
                            "xlabel": "t",
                            "ylabel": "seconds per draw",
                            "logy": True,
                        },
                    )
                )
    autocast_cases = [((256, 256), 8), ((64, 64, 64), 1)] + ([] if quick else [((128, 128, 128), 1)])
    for shape, batch in autocast_cases:
        figures += _autocast_figures(shape, batch, quick, threads)
    figures += _split_figures(threads, quick)
    if not quick:
        image = torch.rand(1, 1, 128, 128, 128)
        for method in ("binary", "sequential"):
            diffusion = DeformationDiffusion(power_method=method)
            diffusion.q_sample(image, 1)  # warm caches so only the draw's own memory is counted
            peak = peak_memory_mb(lambda d=diffusion: d.q_sample(image, 79))
            figures.append(
                figure(
                    f"drdm forward 3D 128x128x128 t=79 peak memory ({method})",
                    peak,
                    "MiB",
                    method=method,
                    note="RSS growth while running one q_sample (benchmarks.memory.peak_memory_mb)",
                )
            )
    return figures


def _split_figures(threads: int, quick: bool) -> list[dict]:
    """One composition's resampling on the 64³ lattice: plain ``F.grid_sample`` vs all threads (bitwise equal)."""
    g = torch.Generator().manual_seed(2)
    field = torch.randn(1, 3, 64, 64, 64, generator=g)
    base = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 64)] * 3, indexing="ij")[::-1], dim=-1)[None]
    grid = base + 0.05 * torch.randn(base.shape, generator=g)
    kwargs = {"mode": "bilinear", "padding_mode": "border", "align_corners": True}
    same = bool(torch.equal(F.grid_sample(field, grid, **kwargs), grid_sample_all_threads(field, grid, **kwargs)))
    out = []
    for label, fn in (("F.grid_sample", F.grid_sample), ("grid_sample_all_threads", grid_sample_all_threads)):
        median, spread = time_call(lambda f=fn: f(field, grid, **kwargs), warmup=1, repeat=3 if quick else 10)
        out.append(
            figure(
                f"grid_sample 3D 64^3 lattice, one composition ({label})",
                median,
                "s",
                spread=spread,
                threads=threads,
                bitwise_equal=same,
            )
        )
    return out


def _autocast_figures(shape: tuple[int, ...], batch: int, quick: bool, threads: int) -> list[dict]:
    """One binary-method draw at t = 79 under bf16 autocast: time, and the difference to the same fp32 draw."""
    label = "x".join(str(s) for s in shape)
    image = torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(1))
    diffusion = DeformationDiffusion(power_method="binary")
    reference = diffusion.q_sample(image, 79, torch.Generator().manual_seed(0))

    def draw() -> object:
        with autocast("bf16", "cpu"):
            return diffusion.q_sample(image, 79, torch.Generator().manual_seed(0))

    median, spread = time_call(draw, warmup=1, repeat=1 if quick or len(shape) == 3 else 3)
    sample = draw()
    diff = max(
        float((sample.cumulative_field - reference.cumulative_field).abs().max()),
        float((sample.step_field - reference.step_field).abs().max()),
        float((sample.image - reference.image).abs().max()),
    )
    dtypes = sorted({str(t.dtype) for t in (sample.image, sample.step_field, sample.cumulative_field)})
    ref, ref_label = None, None
    if shape == (128, 128, 128):
        ref, ref_label = official("drdm_forward_3d_128_t79_s")
    params = {"shape": list(shape), "batch": batch, "t": 79, "method": "binary", "threads": threads}
    note = "the forward process is field composition: an fp32 island, unchanged by the precision setting"
    return [
        figure(
            f"drdm forward {len(shape)}D {label} B={batch} t=79 (binary) under bf16 autocast",
            median,
            "s",
            spread=spread,
            reference=ref,
            reference_label=ref_label,
            output_dtypes=dtypes,
            note=note,
            **params,
        ),
        figure(
            f"drdm forward {len(shape)}D {label} B={batch} t=79: max |bf16-autocast draw - fp32 draw|",
            diff,
            "voxels",
            output_dtypes=dtypes,
            note=note + " (same seed; 0 = bitwise identical)",
            **params,
        ),
    ]


def main() -> None:
    """Print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()

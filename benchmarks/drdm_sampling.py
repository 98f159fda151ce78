"""DRDM sampling cost and precision parity (issue 9): seconds per augmentation output (Algorithm 2) starting at T'
(the paper, our default) vs running all T = 80 recovery steps (the official code), one output per call vs a batch
of outputs per call, fp32 vs bf16 autocast; the recovery network's forward per memory format and precision; and
the displacement statistics and folding fraction of the same draws (same seeds) in fp32 and bf16.

Official reference (issue 9): 15.4 s per 2D 256² output with the official ``DRDM_augment.py`` procedure (80 steps x
K = 2 passes, fp32) on these 2 cores. The network's weights do not change the cost; a briefly trained network
(``_train``: a few dozen to a few hundred iterations of :class:`drdm.trainer.DRDMTrainer` on smooth synthetic
images) is used so the recovered fields differ from the random ones and the parity statistics are not trivial.

Equal deformation (issue 17, :mod:`benchmarks._drdm_equal`): our implementation of the official procedure (all 80
steps, K = 2, fp32) against fast candidates (``recovery_stride``, Algorithm 2's start at T', bf16 where the CPU
has native bf16) over the same seeds; the speed-up vs the official figure is recorded only for a candidate whose
mean and p99 |φ| are within 5 % and whose folding is not higher. The full run also times ``torch.compile`` of the
network (the sampler's ``compile_network`` option).

Run: ``python -m benchmarks.drdm_sampling [--quick]`` (quick: 2D 64² and 3D 16³, a minute or two; full: 2D 256²
and 3D 64³, about 15 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from benchmarks._drdm_equal import compile_figures, equal_deformation_figures, native_bf16
from benchmarks._drdm_equal import relative as _relative
from benchmarks._drdm_equal import stats as _stats
from benchmarks.memory import peak_memory_mb
from benchmarks.official import official
from benchmarks.timing import figure, time_call
from ddcore.precision import autocast
from drdm.diffusion import DeformationDiffusion
from drdm.networks import RecoveryNet
from drdm.sampler import DRDMSampler, SampleResult
from drdm.trainer import DRDMTrainer

__all__ = ["NAME", "run"]

NAME = "drdm_sampling"

PLOT_SECONDS = {
    "id": "DRDM seconds per augmentation output",
    "xlabel": "outputs generated per call (batched)",
    "ylabel": "seconds per output",
    "logy": True,
}


def _images(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Smooth random images in [0, 1]: coarse uniform noise upsampled (bicubic / trilinear)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, *([6] * len(shape)), generator=gen)
    img = F.interpolate(coarse, size=shape, mode="bicubic" if len(shape) == 2 else "trilinear", align_corners=False)
    low = img.flatten(2).amin(2).view(count, 1, *([1] * len(shape)))
    img = img - low
    return img / img.flatten(2).amax(2).clamp(min=1e-6).view(count, 1, *([1] * len(shape)))


def _train(d: int, size: int, iterations: int, batch: int = 4) -> tuple[RecoveryNet, dict]:
    """A short fp32 training run of the project's trainer on synthetic images (so fields are not trivial)."""
    torch.manual_seed(0)
    net = RecoveryNet(d)
    images = _images(iterations * batch, (size,) * d, seed=1)
    batches = [{"image": images[i : i + batch]} for i in range(0, len(images), batch)]
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    trainer = DRDMTrainer("cpu", 1, batches, net, optimizer, DeformationDiffusion(), epoch_length=len(batches))
    start = time.perf_counter()
    trainer.run()
    info = {
        "train_shape": [size] * d,
        "train_iterations": iterations,
        "train_batch": batch,
        "train_seconds": round(time.perf_counter() - start, 2),
        "train_final_loss": round(float(trainer.state.output["loss"]), 4),
        "train_final_cosine": round(float(trainer.state.output.get("loss_ang", float("nan"))), 4),
    }
    return net.eval(), info


def _sampling_figures(
    net: RecoveryNet, shape: tuple[int, ...], t_prime: int, plan: list[tuple[str, str, int]], train_info: dict
) -> list[dict]:
    """Time ``augment`` for each (start, precision, outputs) of ``plan``; parity where both precisions ran."""
    figures: list[dict] = []
    label = "x".join(str(s) for s in shape)
    image = _images(1, shape, seed=99)
    diffusion = DeformationDiffusion()
    with torch.no_grad():
        net(image, torch.zeros(1, dtype=torch.long))  # warm-up (allocator, kernels) outside the timings
    outputs_of: dict[tuple[str, str, int], list[SampleResult]] = {}
    for start, precision, outputs in plan:
        sampler = DRDMSampler(
            net, diffusion, start=start, folding_threshold=None, precision=precision, batch_size=outputs
        )
        begin = time.perf_counter()
        results = sampler.augment(image, [t_prime], outputs, generator=torch.Generator().manual_seed(0))
        seconds = (time.perf_counter() - begin) / outputs
        outputs_of[(start, precision, outputs)] = results
        steps = len(sampler.recovery_levels(t_prime))
        is_ref = shape == (256, 256)
        figures.append(
            figure(
                f"drdm augmentation output {len(shape)}D {label} T'={t_prime} ({start}, {steps} steps) "
                f"{precision}, {outputs} per call",
                seconds,
                "s",
                reference=official("drdm_augment_2d_256_s_per_output")[0] if is_ref else None,
                reference_label=official("drdm_augment_2d_256_s_per_output")[1] if is_ref else None,
                shape=list(shape),
                t_prime=t_prime,
                start=start,
                precision=precision,
                outputs_per_call=outputs,
                batch_size=outputs,
                recovery_steps=steps,
                network_passes=2 * steps,
                memory_format=net.memory_format,
                threads=torch.get_num_threads(),
                network="short-trained RecoveryNet (cost does not depend on the weights)",
                plot={**PLOT_SECONDS, "x": outputs, "series": f"{len(shape)}D {label} {start} {precision}"},
            )
        )
    size = max(shape)
    for (start, precision, outputs), results in outputs_of.items():
        if precision != "bf16" or (start, "fp32", outputs) not in outputs_of:
            continue
        if any(k[:2] == (start, "bf16") and k[2] > outputs and (start, "fp32", k[2]) in outputs_of for k in outputs_of):
            continue  # parity from the largest set of outputs run in both precisions
        ref, low = outputs_of[(start, "fp32", outputs)], results
        s32, s16 = _stats(ref, size), _stats(low, size)
        diff = torch.cat([a.ddf - b.ddf for a, b in zip(ref, low)]).norm(dim=1)
        common = {
            "shape": list(shape),
            "t_prime": t_prime,
            "start": start,
            "outputs": outputs,
            "seeds": "same seeds for both precisions (identical random fields)",
            **train_info,
        }
        for key, name, unit in (
            ("mean_pct", "mean |phi|", "% of image size"),
            ("p99_pct", "p99 |phi|", "% of image size"),
            ("folding_pct", "folding fraction", "%"),
        ):
            for prec, stats in (("fp32", s32), ("bf16", s16)):
                figures.append(
                    figure(
                        f"drdm {len(shape)}D {label} T'={t_prime} ({start}) {name} {prec}",
                        stats[key],
                        unit,
                        precision=prec,
                        recovery_change_vox=stats["recovery_change_vox"],
                        **common,
                    )
                )
            rel = _relative(s16[key], s32[key])
            figures.append(
                figure(
                    f"drdm {len(shape)}D {label} T'={t_prime} ({start}) {name}: bf16 vs fp32 relative change",
                    0.0 if rel is None else abs(rel),
                    "%",
                    fp32=s32[key],
                    bf16=s16[key],
                    absolute_change=s16[key] - s32[key],
                    target="within 5 %",
                    note=None if rel is not None else "fp32 value is 0: relative change undefined, absolute shown",
                    **common,
                )
            )
        figures.append(
            figure(
                f"drdm {len(shape)}D {label} T'={t_prime} ({start}) |phi_bf16 - phi_fp32| mean",
                float(diff.mean()),
                "voxels",
                max_vox=float(diff.max()),
                recovery_change_vox=s32["recovery_change_vox"],
                **common,
            )
        )
    return figures


def _network_figures(shape: tuple[int, ...], repeat: int) -> list[dict]:
    """Time one RecoveryNet call (K = 2 passes) per memory format and precision."""
    figures: list[dict] = []
    label = "x".join(str(s) for s in shape)
    x = _images(1, shape, seed=3)
    t = torch.full((1,), 40, dtype=torch.long)
    # 3D networks always run contiguous (see drdm.networks.RecoveryNet): only 2D has a layout choice
    for memory_format in ("contiguous", "channels_last") if len(shape) == 2 else ("contiguous",):
        torch.manual_seed(0)
        net = RecoveryNet(len(shape), memory_format=memory_format).eval()
        for precision in ("fp32", "bf16"):

            def call(n: RecoveryNet = net, p: str = precision) -> None:
                with torch.no_grad(), autocast(p, "cpu"):
                    n(x, t)

            median, spread = time_call(call, warmup=1, repeat=repeat)
            figures.append(
                figure(
                    f"drdm recovery network forward (K=2) {len(shape)}D {label} {memory_format} {precision}",
                    median,
                    "s",
                    spread=spread,
                    shape=list(shape),
                    memory_format=memory_format,
                    precision=precision,
                    batch=1,
                    threads=torch.get_num_threads(),
                )
            )
    return figures


def run(quick: bool = False) -> list[dict]:
    """Sampling cost per output, network forward per format/precision, and bf16-vs-fp32 parity.

    Args:
        quick: 2D 64² and 3D 16³ with small T' (well under a minute); the full run uses 2D 256² and 3D 64³.

    Returns:
        Figures.
    """
    threads = torch.get_num_threads()
    # as the other modules: quick = 1 thread (tiny tensors; 2 OpenMP threads on 2 shared, loaded cores were measured
    # 10-20x slower), full = 2 threads, the cores the official reference was measured on (set explicitly: the
    # 2026-11-23 record inherited OMP_NUM_THREADS=1 and so timed 1 thread against the official 2)
    torch.set_num_threads(1 if quick else max(1, min(2, os.cpu_count() or 1)))
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _without_emulated_bf16(plan: list[tuple[str, str, int]], d: int, quick: bool) -> list[tuple[str, str, int]]:
    """The plan for a CPU without native bf16 (no AVX512/AMX), where bf16 autocast is emulated.

    Measured ~7x slower than fp32 there (an AVX2 EPYC; the quick run took 6 minutes, 3 of them one 3D all-steps bf16
    output): keep only the bf16 runs that pair with an fp32 run at one output per call, all-steps only in 2D full.
    """
    keep = {("t_prime", 1)} if quick or d == 3 else {("t_prime", 1), ("all", 1)}
    return [e for e in plan if e[1] == "fp32" or (e[0], e[2]) in keep]


def _run(quick: bool) -> list[dict]:
    figures: list[dict] = []
    if quick:
        plan_2d = [("t_prime", p, n) for p in ("fp32", "bf16") for n in (1, 4)]
        plan_2d += [("all", "fp32", 1), ("all", "bf16", 1), ("all", "bf16", 4)]
        plan_3d = [("t_prime", p, n) for p in ("fp32", "bf16") for n in (1, 2)] + [("all", "bf16", 1)]
        cases = [(2, (64, 64), 8, 48, 15, plan_2d), (3, (16, 16, 16), 4, 16, 2, plan_3d)]
        network_shapes = [((64, 64), 2), ((16, 16, 16), 2)]
        equal_outputs = 1
    else:
        plan_2d = [("t_prime", p, n) for p in ("fp32", "bf16") for n in (1, 8)]
        plan_2d += [("all", "fp32", 1), ("all", "bf16", 1), ("all", "bf16", 8)]
        plan_3d = [("t_prime", p, n) for p in ("fp32", "bf16") for n in (1, 2)] + [("all", "bf16", 1)]
        cases = [(2, (256, 256), 32, 64, 200, plan_2d), (3, (64, 64, 64), 16, 32, 40, plan_3d)]
        network_shapes = [((256, 256), 3), ((64, 64, 64), 2)]
        equal_outputs = 3
    if not native_bf16():
        cases = [(*c[:5], _without_emulated_bf16(c[5], c[0], quick)) for c in cases]
    for d, shape, t_prime, train_size, iterations, plan in cases:
        net, info = _train(d, train_size, iterations)
        figures.append(
            figure(
                f"drdm short training for the parity network ({d}D {train_size}^{d}, {iterations} iterations)",
                info["train_seconds"],
                "s",
                **info,
            )
        )
        figures += _sampling_figures(net, shape, t_prime, plan, info)
        if d == 2:  # the official reference is 2D 256²
            ref_key = "drdm_augment_2d_256_s_per_output"
            ref = official(ref_key) if shape == (256, 256) else None
            image = _images(1, shape, seed=99)
            figures += equal_deformation_figures(net, image, t_prime, equal_outputs, ref, info)
        if not quick and d == 3:
            precision = "bf16" if native_bf16() else "fp32"
            sampler = DRDMSampler(net, DeformationDiffusion(), folding_threshold=None, precision=precision)
            image = _images(1, shape, seed=99)
            peak = peak_memory_mb(lambda s=sampler, x=image: s.sample(x, 8))
            figures.append(
                figure(
                    f"drdm augmentation output 3D {'x'.join(map(str, shape))} peak memory ({precision}, 1 output)",
                    peak,
                    "MiB",
                    shape=list(shape),
                    t_prime=8,
                    precision=precision,
                )
            )
    for shape, repeat in network_shapes:
        figures += _network_figures(shape, repeat)
    if not quick:  # compiling takes minutes per shape: full run only
        figures += compile_figures((256, 256), 3)
    return figures


def main() -> None:
    """Print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()

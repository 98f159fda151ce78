"""What makes the divergence-aware training step fast on this CPU (issue 17, part 1): each lever measured alone.

One divergence-aware step (forward, DAMM loss, backward, AdamW; :func:`benchmarks.damm_training.make_train_step`)
of the paper-scale denoiser at batch 16, 16x16 latents, in fp32 and bf16, with the levers switched on one after the
other:

- ``keep_freed_memory``: glibc keeps freed blocks for reuse (:func:`ddcore.allocator.keep_freed_memory`, the
  bundle's ``cpu_keep_freed_memory``). Without it every step maps and zero-fills its weight copies, gradients and
  activations again: the minor page faults per step are reported beside the time;
- ``fused``: AdamW's fused kernel (the bundle's ``fused_optimizer``) instead of its per-tensor loop;
- ``small_conv``: 2D convolutions on maps of at most 16 positions (the 4x4 bottom of the U-Net) as one matmul
  (:mod:`ddcore.small_conv`, the denoiser's ``small_conv_max_pixels``);
- ``channels_last``: the channels-last memory format of model and inputs.

Each configuration runs in a fresh subprocess, because the allocator setting cannot be undone in a process and
the page faults are counted per process. One step of the fastest configuration is profiled with
``torch.profiler``: the share of the step's self CPU time of its most expensive operators. The targets of issue
17 are computed for the bundle's defaults (``keep_freed_memory``, ``fused`` and ``small_conv``) in bf16: the
speed-up over the official code's step measured on a machine of this kind (:mod:`benchmarks.official`) and the
share of this machine's bf16 matmul peak (measured in the same run).

``quick=True``: the demo denoiser at batch 4, two configurations, two timed steps (a plumbing check). Run alone
with ``python -m benchmarks.damm_train_levers [--quick]``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.hardware import matmul_peak_gflops
from benchmarks.official import official
from benchmarks.timing import figure, time_call

__all__ = ["LEVERS", "NAME", "measure", "run"]

NAME = "damm_train_levers"

#: (label, precision, keep_freed_memory, fused optimizer, small_conv, channels-last), in the order they are measured.
LEVERS: tuple[tuple[str, str, bool, bool, bool, bool], ...] = (
    ("fp32", "fp32", False, False, False, False),
    ("fp32 + keep_freed_memory", "fp32", True, False, False, False),
    ("fp32 + keep_freed_memory + fused", "fp32", True, True, False, False),
    ("fp32 + keep_freed_memory + fused + small_conv", "fp32", True, True, True, False),
    ("bf16", "bf16", False, False, False, False),
    ("bf16 + keep_freed_memory", "bf16", True, False, False, False),
    ("bf16 + fused", "bf16", False, True, False, False),
    ("bf16 + small_conv", "bf16", False, False, True, False),
    ("bf16 + keep_freed_memory + fused", "bf16", True, True, False, False),
    ("bf16 + keep_freed_memory + fused + small_conv", "bf16", True, True, True, False),
    ("bf16 + keep_freed_memory + fused + small_conv + channels-last", "bf16", True, True, True, True),
)
#: The bundle's defaults: the configuration the targets are computed for.
DEFAULT_LABEL = "bf16 + keep_freed_memory + fused + small_conv"
QUICK_LABELS = ("fp32", DEFAULT_LABEL)


def measure(setting: dict[str, Any]) -> dict[str, Any]:
    """Time one configuration in this process (the child side of :func:`run`).

    Args:
        setting: ``config`` (``"paper"``/``"demo"``), ``batch``, ``precision``, ``keep_freed_memory``, ``fused``,
            ``small_conv``, ``channels_last``, ``threads``, ``repeat``, ``profile`` (also return the top operators).

    Returns:
        ``step_s`` (median), ``spread_s``, ``faults_per_step`` (minor page faults), ``maxrss_mib``, ``flops`` per
        step (forward and backward) and, with ``profile``, ``top_ops``: ``[name, self CPU ms, share]``.
    """
    from benchmarks.damm_network import make_denoiser
    from benchmarks.damm_training import make_train_step, train_step_flops
    from damm.networks import DEMO_DENOISER_CONFIG, PAPER_DENOISER_CONFIG
    from ddcore.allocator import keep_freed_memory

    torch.set_num_threads(int(setting["threads"]))
    kept = keep_freed_memory(bool(setting["keep_freed_memory"]))
    config = PAPER_DENOISER_CONFIG if setting["config"] == "paper" else DEMO_DENOISER_CONFIG
    model = make_denoiser({**config, "small_conv_max_pixels": 16 if setting["small_conv"] else 0}).train()
    flops = train_step_flops(model) * setting["batch"]
    if setting["channels_last"]:
        model.to(memory_format=torch.channels_last)
    step = make_train_step(
        model,
        setting["batch"],
        setting["precision"],
        channels_last=setting["channels_last"],
        fused_optimizer=setting["fused"],
    )
    step()
    step()
    repeat = int(setting["repeat"])
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    med, spread = time_call(step, warmup=0, repeat=repeat)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / repeat
    out: dict[str, Any] = {
        "step_s": med,
        "spread_s": spread,
        "faults_per_step": faults,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "flops": flops,
        "allocator_setting_applied": kept,
    }
    if setting.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        out["top_ops"] = [[e.key, e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total] for e in events[:8]]
    return out


def _child(setting: dict[str, Any]) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.damm_train_levers", "--child", json.dumps(setting)],
        capture_output=True,
        text=True,
        check=False,
        cwd=repo,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"damm_train_levers child {setting} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    """Measure every lever (see the module docstring).

    Args:
        quick: demo denoiser, batch 4, two configurations.

    Returns:
        Figure records.
    """
    threads = 1 if quick else max(1, min(2, torch.get_num_threads()))
    torch.set_num_threads(threads)
    peak32 = matmul_peak_gflops(torch.float32)
    peak16 = matmul_peak_gflops(torch.bfloat16)
    config, batch = ("demo", 4) if quick else ("paper", 16)
    common = {"config": config, "batch": batch, "threads": threads, "quick": quick}
    figs = [
        figure("matmul peak fp32", peak32, "GFLOP/s", dtype="fp32", threads=threads),
        figure("matmul peak bf16", peak16, "GFLOP/s", dtype="bf16", threads=threads),
    ]
    results: dict[str, dict[str, Any]] = {}
    for label, precision, keep, fused, small_conv, channels_last in LEVERS:
        if quick and label not in QUICK_LABELS:
            continue
        setting = {
            **common,
            "precision": precision,
            "keep_freed_memory": keep,
            "fused": fused,
            "small_conv": small_conv,
            "channels_last": channels_last,
            "repeat": 2 if quick else 5,
        }
        res = results[label] = _child(setting)
        p = {**common, "precision": precision, "keep_freed_memory": keep, "fused": fused, "small_conv": small_conv}
        p["channels_last"] = channels_last
        step_name = f"{config} b{batch} {label}: divergence-aware step"
        figs.append(figure(step_name, res["step_s"], "s", res["spread_s"], **p))
        figs.append(figure(f"{config} b{batch} {label}: minor page faults per step", res["faults_per_step"], "", **p))
        figs.append(figure(f"{config} b{batch} {label}: peak resident memory", res["maxrss_mib"], "MiB", **p))
        peak = peak16 if precision == "bf16" else peak32
        achieved = res["flops"] / res["step_s"] / 1e9
        figs.append(
            figure(
                f"{config} b{batch} {label}: achieved GFLOP/s as % of the {precision} matmul peak",
                100 * achieved / peak,
                "%",
                achieved_gflops=round(achieved, 1),
                peak_gflops=round(peak, 1),
                **p,
            )
        )
    base = {"fp32": results["fp32"]["step_s"]}
    if "bf16" in results:
        base["bf16"] = results["bf16"]["step_s"]
    for label, precision, *_ in LEVERS:
        if label in results and label != precision and precision in base:
            figs.append(
                figure(
                    f"{config} b{batch} {label}: speed-up over plain {precision}",
                    base[precision] / results[label]["step_s"],
                    "x",
                    **common,
                )
            )
    default = results[DEFAULT_LABEL]
    ref, text = official("damm_train_step_s_b16")
    figs.append(
        figure(
            f"{config} b{batch} bundle defaults ({DEFAULT_LABEL}): speed-up over the official step (target >= 5x)",
            ref / default["step_s"],
            "x",
            reference_label=text,
            official_s=ref,
            ours_s=default["step_s"],
            **common,
        )
    )
    figs.append(
        figure(
            f"{config} b{batch} bundle defaults ({DEFAULT_LABEL}): % of the bf16 matmul peak (target >= 25 %)",
            100 * default["flops"] / default["step_s"] / 1e9 / peak16,
            "%",
            **common,
        )
    )
    fastest = min(results, key=lambda k: results[k]["step_s"])
    lv = next(lever for lever in LEVERS if lever[0] == fastest)
    prof = _child(
        {
            **common,
            "precision": lv[1],
            "keep_freed_memory": lv[2],
            "fused": lv[3],
            "small_conv": lv[4],
            "channels_last": lv[5],
            "repeat": 1,
            "profile": True,
        }
    )
    for op, ms, share in prof["top_ops"]:
        figs.append(
            figure(f"{config} b{batch} {fastest}: profile, {op} share of self CPU time", 100 * share, "%", self_ms=ms)
        )
    return figs


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(measure(json.loads(sys.argv[sys.argv.index("--child") + 1]))))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

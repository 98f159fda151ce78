"""Shared code of the cross-subject task benchmarks (``task_brats``, ``task_microscopy``).

Protocol (issue 20): train on one subject (or field), evaluate the whole other one, both directions. Every
budget is an iteration count (``ae_iterations``, ``dm_iterations``, ``baseline_iterations``), so a record does
not depend on how busy the machine was. One direction runs the task bundle's run ids ``train_autoencoder``,
``train_diffusion``, ``train_baseline`` and ``evaluating`` (which fits the trivial baselines first), then the
quality-against-iterations curve: the snapshots the training wrote at the fractions ``dm_snapshot_fractions``
(DAMM, EMA weights) and ``baseline_snapshot_fractions`` (UNet) are evaluated on the same subject, and the final
models give the 100 % point. The raw (non-EMA) denoiser of the last checkpoint is evaluated too, which measures
the EMA lever without a second training.

Directions run in parallel processes, one torch thread each (on a 2-core machine: both cores, no spin-waits).
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.timing import figure
from data_prep.shared import REPO_ROOT

__all__ = ["CONFIGS", "bundle_default", "curve_fractions", "direction_figures", "run_direction", "run_directions"]

CONFIGS = REPO_ROOT / "bundle" / "configs"


def bundle_default(key: str, config: str = "common.json") -> Any:
    """A setting's default as the bundle config ``config`` defines it (the single definition benchmarks read)."""
    return json.loads((CONFIGS / config).read_text())[key]


def curve_fractions(settings: dict[str, Any]) -> list[float]:
    """The curve's budget fractions: the snapshots and 1.0."""
    return sorted({*map(float, settings.get("dm_snapshot_fractions", [])), 1.0})


def _workflow(overlay: str, root: Path, run_id: str, settings: dict[str, Any]) -> float:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train.json"), str(CONFIGS / overlay)],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id=run_id,
        workflow_type="train",
        bundle_root=str(root),
        progress=False,
        log_every=1000,
        **settings,
    )
    wf.initialize()
    t0 = time.perf_counter()
    try:
        wf.run()
    finally:
        wf.finalize()
    return time.perf_counter() - t0


def _raw_denoiser_model(root: Path) -> Path | None:
    """``models/model_raw.pt``: the exported model with the last checkpoint's raw (non-EMA) denoiser weights."""
    import torch

    from ddcore.checkpoints import latest_checkpoint

    ckpt = latest_checkpoint(root / "models" / "diffusion_checkpoints")
    final = root / "models" / "model.pt"
    if ckpt is None or not final.is_file():
        return None
    state = torch.load(final, map_location="cpu", weights_only=True)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)["denoiser"]
    state.update({f"denoiser.{k}": v for k, v in raw.items()})
    out = root / "models" / "model_raw.pt"
    torch.save(state, out)
    return out


def run_direction(job: dict[str, Any]) -> dict[str, Any]:
    """Train every model of one direction and evaluate it (run in a child process).

    Args:
        job: ``{"overlay", "root", "settings", "label", "fractions", "threads"}``.

    Returns:
        ``{"label", "seconds": {stage: s}, "final": task_evaluation.json, "curve": {fraction: {"damm", "unet"}},
        "raw_denoiser": evaluation of the non-EMA weights or None, "settings"}``.
    """
    import torch

    torch.set_num_threads(int(job.get("threads", 1)))
    os.environ.setdefault("OMP_NUM_THREADS", str(job.get("threads", 1)))
    root, overlay, settings = Path(job["root"]), job["overlay"], dict(job["settings"])
    settings["num_threads"] = int(job.get("threads", 1))
    seconds = {
        "autoencoders": _workflow(overlay, root, "train_autoencoder", settings),
        "diffusion": _workflow(overlay, root, "train_diffusion", settings),
        "unet_baseline": _workflow(overlay, root, "train_baseline", settings),
    }
    t0 = time.perf_counter()
    _workflow(overlay, root, "evaluating", settings)
    seconds["evaluation"] = time.perf_counter() - t0
    final = json.loads((root / "eval" / "task" / "task_evaluation.json").read_text())
    from damm.stages import read_training_times

    recorded = read_training_times(root / "models")  # a kept bundle's stages were skipped: their recorded times
    for key, stage in (("autoencoders", "stage 1 (autoencoders)"), ("diffusion", "stage 2 (diffusion)"),
                       ("unet_baseline", "UNet baseline")):  # fmt: skip
        if stage in recorded:
            seconds[key] = float(recorded[stage]["seconds"])
    models = root / "models"
    curve: dict[str, Any] = {}
    for frac in job["fractions"]:
        if frac >= 1.0:
            continue
        dm_it = round(frac * int(settings["dm_iterations"]))
        un_it = round(frac * int(settings["baseline_iterations"]))
        out = root / "eval" / f"curve_{frac:g}"
        over = {
            **settings,
            "model_path": str(models / f"model_iteration={dm_it}.pt"),
            "baseline_path": str(models / f"baseline_unet_iteration={un_it}.pt"),
            "task_eval_branches": ["damm"],
            "task_output_dir": str(out),
            "task_write_outputs": False,
        }
        _workflow(overlay, root, "evaluating", over)
        curve[f"{frac:g}"] = json.loads((out / "task_evaluation.json").read_text())
    raw = _raw_denoiser_model(root)
    raw_eval = None
    if raw is not None:
        out = root / "eval" / "raw_denoiser"
        over = {
            **settings,
            "model_path": str(raw),
            "task_eval_branches": ["damm"],
            "task_output_dir": str(out),
            "task_write_outputs": False,
        }
        _workflow(overlay, root, "evaluating", over)
        raw_eval = json.loads((out / "task_evaluation.json").read_text())
    return {
        "label": job["label"],
        "seconds": seconds,
        "final": final,
        "curve": curve,
        "raw_denoiser": raw_eval,
        "settings": settings,
    }


def run_directions(jobs: list[dict[str, Any]], parallel: bool) -> list[dict[str, Any]]:
    """Run the directions, in parallel child processes when ``parallel``.

    Args:
        jobs: :func:`run_direction` jobs.
        parallel: one process per direction (spawned, so each sets its own threads).

    Returns:
        The results, in job order.
    """
    if not parallel or len(jobs) == 1:
        return [run_direction(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=get_context("spawn")) as pool:
        return list(pool.map(run_direction, jobs))


def _metric_figs(label: str, method: str, regions: dict[str, Any], common: dict[str, Any]) -> list[dict]:
    figs = []
    for region, vals in regions.items():
        for metric, unit in (("psnr", "dB"), ("ssim", ""), ("mae", "")):
            value = vals.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            figs.append(
                figure(
                    f"{label}: {method} {metric.upper()} ({region})",
                    value,
                    unit,
                    method=method,
                    region=region,
                    metric=metric,
                    **common,
                )
            )
    return figs


def direction_figures(result: dict[str, Any], unit_region: str) -> list[dict[str, Any]]:
    """Figure records of one direction: every method's metrics (ranked by SSIM, then PSNR, in ``unit_region``),
    training times, branch routing, the curve and the EMA comparison.

    Args:
        result: :func:`run_direction` output.
        unit_region: the region the ranking uses (``"brain"`` / ``"field"``).

    Returns:
        Figure records.
    """
    label, final, settings = result["label"], result["final"], result["settings"]
    budgets = {k: settings.get(k) for k in ("ae_iterations", "dm_iterations", "baseline_iterations")}
    common = {
        "direction": label,
        "split": final.get("split_mode"),
        "sampler": final.get("sampler"),
        "threads": settings.get("num_threads"),
        **budgets,
    }
    figs: list[dict[str, Any]] = []
    mean = final["mean"]
    ranked = sorted(
        (m for m in mean if unit_region in mean[m]),
        key=lambda m: (-mean[m][unit_region]["ssim"], -mean[m][unit_region]["psnr"]),
    )
    for rank, method in enumerate(ranked, 1):
        figs += _metric_figs(label, method, mean[method], {**common, "rank": rank})
    for stage, secs in result["seconds"].items():
        figs.append(figure(f"{label}: {stage} time", secs, "s", stage=stage, **common))
    for subject in final["subjects"].values():
        for method, rec in subject["methods"].items():
            stats = rec.get("branch_statistics") or {}
            if "multi_step_fraction" in stats:
                figs.append(
                    figure(
                        f"{label}: {method} fraction of steps on the multi-modal branch",
                        stats["multi_step_fraction"],
                        "",
                        method=method,
                        **common,
                    )
                )
    for frac, ev in sorted(result["curve"].items(), key=lambda kv: float(kv[0])):
        for method, regions in ev["mean"].items():
            if method in ("damm", "unet_baseline") and unit_region in regions:
                figs += _metric_figs(
                    f"{label} at {float(frac):.0%} of the budget",
                    method,
                    {unit_region: regions[unit_region]},
                    {**common, "budget_fraction": float(frac)},
                )
    for method in ("damm", "unet_baseline"):
        if method in mean and unit_region in mean[method]:
            figs += _metric_figs(
                f"{label} at 100% of the budget",
                method,
                {unit_region: mean[method][unit_region]},
                {**common, "budget_fraction": 1.0},
            )
    if result.get("raw_denoiser"):
        raw = result["raw_denoiser"]["mean"].get("damm", {})
        if unit_region in raw:
            figs += _metric_figs(
                f"{label}: damm without EMA", "damm_raw_weights", {unit_region: raw[unit_region]}, common
            )
    return figs

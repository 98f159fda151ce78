"""Real-task results: BraTS FLAIR synthesis from T2 (anchor), T1 and T1c on held-out slices of the shared subject.

Trains the task bundle (``train.json`` + ``task_brats.json``) within a wall-clock budget (autoencoders, then
diffusion), trains the MONAI ``UNet`` L1 baseline with the *same total budget* on the same slices, and evaluates
every method by whole-subject inference on the input grid: brain-masked PSNR / SSIM / MAE on the held-out slab
of axial slices (and inside the tumour label), beside the target autoencoder's reconstruction (the ceiling).

Budget (full run, CPU, one thread of the shared 2-core machine): autoencoders 3 min + diffusion 3 min = 6 min for
DAMM-Diffusion, 6 min for the UNet; 2 mm voxels, DDIM 50 steps. ``quick=True``: 4 mm, tiny networks, under a
minute. ``TASK_BENCH_KEEP=DIR`` keeps the trained bundle and the predictions. Run alone with
``python -m benchmarks.task_brats [--quick]``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import figure
from data_prep.shared import REPO_ROOT, shared_data_dir

__all__ = ["NAME", "run", "run_task"]

NAME = "task_brats"

CONFIGS = REPO_ROOT / "bundle" / "configs"

QUICK = {
    "ae_channels": [8, 8, 8],
    "dm_channels": [8, 8, 8, 8],
    "dm_time_embed_dim": 16,
    "ae_epochs": 1,
    "ae_batch_size": 8,
    "ae_adversarial_start_iteration": 0,
    "ae_val_interval": 1,
    "dm_epochs": 2,
    "dm_batch_size": 8,
    "dm_divergence_aware_start_iteration": 2,
    "num_inference_steps": 3,
    "baseline_iterations": 4,
    "baseline_channels": [8, 8, 8, 8],
    "task_pixdim": [4, 4, 4],
    "task_write_outputs": False,
}
FULL = {
    "ae_epochs": 100000,
    "dm_epochs": 100000,
    "ae_val_interval": 1000,
    "ae_batch_size": 8,
    "ae_adversarial_start_iteration": 200,
    "dm_batch_size": 16,
    "dm_divergence_aware_start_iteration": 200,
    "num_inference_steps": 50,
    "baseline_iterations": 10**9,
    "task_pixdim": [2, 2, 2],
}
BUDGET_S = {"ae": 180.0, "dm": 180.0}


def _workflow(overlay: str, root: Path, data: Path, run_id: str, settings: dict[str, Any]) -> float:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train.json"), str(CONFIGS / overlay)],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id=run_id,
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(data),
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


def run_task(
    label: str, overlay: str, data: Path, settings: dict[str, Any], budget_s: dict[str, float] | None, keep: str | None
) -> list[dict]:
    """Train DAMM (two stages) and the UNet baseline with the same budget, evaluate, and return figures.

    Args:
        label: figure name prefix.
        overlay: task overlay file name.
        data: dataset folder.
        settings: config overrides.
        budget_s: ``{"ae": s, "dm": s}`` wall-clock budgets (``None``: epochs/iterations decide).
        keep: folder to keep the bundle in (``None``: a temporary folder).

    Returns:
        Figure records.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a shared 2-core machine: 1 thread avoids OpenMP spin-waits
    try:
        return _run_task(label, overlay, data, settings, budget_s, keep)
    finally:
        torch.set_num_threads(threads)


def _run_task(
    label: str, overlay: str, data: Path, settings: dict[str, Any], budget_s: dict[str, float] | None, keep: str | None
) -> list[dict]:
    settings = dict(settings)
    if budget_s:
        settings.update(
            ae_time_budget_s=budget_s["ae"],
            dm_time_budget_s=budget_s["dm"],
            baseline_time_budget_s=budget_s["ae"] + budget_s["dm"],
        )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep) if keep else Path(tmp)
        secs = {
            "autoencoders": _workflow(overlay, root, data, "train_autoencoder", settings),
            "diffusion": _workflow(overlay, root, data, "train_diffusion", settings),
            "unet_baseline": _workflow(overlay, root, data, "train_baseline", settings),
        }
        _workflow(overlay, root, data, "evaluating", settings)
        res = json.loads((root / "eval" / "task" / "task_evaluation.json").read_text())
    common = {
        "budget_s": budget_s,
        "sampler": res["sampler"],
        "split": res["split_mode"],
        "threads": torch.get_num_threads(),
    }
    figs = [
        figure(
            f"{label}: DAMM training time (autoencoders + diffusion)",
            secs["autoencoders"] + secs["diffusion"],
            "s",
            autoencoders_s=round(secs["autoencoders"], 1),
            diffusion_s=round(secs["diffusion"], 1),
            **common,
        ),
        figure(f"{label}: UNet baseline training time", secs["unet_baseline"], "s", **common),
    ]
    for method, regions in res["mean"].items():
        for region, vals in regions.items():
            for metric, unit in (("psnr", "dB"), ("ssim", ""), ("mae", "")):
                figs.append(
                    figure(
                        f"{label}: {method} {metric.upper()} ({_region(region)})",
                        vals[metric],
                        unit,
                        method=method,
                        region=region,
                        **common,
                    )
                )
    for subject in res["subjects"].values():
        for method, rec in subject["methods"].items():
            figs.append(
                figure(
                    f"{label}: {method} inference time per subject/field", rec["seconds"], "s", method=method, **common
                )
            )
            if "branch_statistics" in rec and "multi_step_fraction" in rec["branch_statistics"]:
                figs.append(
                    figure(
                        f"{label}: {method} fraction of steps on the multi-modal branch",
                        rec["branch_statistics"]["multi_step_fraction"],
                        "",
                        method=method,
                    )
                )
        break
    return figs


def _region(region: str) -> str:
    return "held-out part" if region == "heldout" else f"{region}, held-out"


def run(quick: bool = False) -> list[dict]:
    """Measure the figures (skipped, with one note figure, when the shared data is absent).

    Args:
        quick: 4 mm, tiny networks, 3 sampling steps (well under a minute).

    Returns:
        Figure records.
    """
    shared = shared_data_dir()
    data = None if shared is None else shared / "brats"
    if data is None or not data.is_dir():
        return [figure("task_brats: shared BraTS data absent, nothing measured", 0.0, "")]
    settings = QUICK if quick else FULL
    keep = os.environ.get("TASK_BENCH_KEEP")  # optional folder to keep the trained bundle and predictions in
    return run_task("brats flair", "task_brats.json", data, settings, None if quick else BUDGET_S, keep)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

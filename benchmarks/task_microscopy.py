"""Real-task results: fluorescence channel prediction on the held-out part of real fields.

Two tasks on the shared CellProfiler example fields: ``rhodamine`` from ``fitc`` (anchor) and ``dapi`` on the two
fly fields, and ``ph3`` (a sparse mitosis marker) from ``dna`` (anchor) and ``cellbody`` on the human field. Each
field's right-most quarter of columns is held out (a half-tile gap before it is unused); the model trains on 64 px
tiles of the rest. DAMM-Diffusion (autoencoders, then diffusion) and the MONAI ``UNet`` L1 baseline get the same
wall-clock budget; every method is evaluated by whole-field sliding-window inference (Gaussian blending) on the
held-out columns, beside the target autoencoder's reconstruction (the ceiling).

Budget (full run, CPU, one thread of the shared 2-core machine): fly 2 + 4 = 6 min for DAMM and 6 min for the
UNet; human 1 + 2 = 3 min and 3 min; DDIM 50 steps. ``quick=True``: the human field, 32 px tiles, tiny networks,
3 steps (well under a minute). ``TASK_BENCH_KEEP=DIR`` keeps the trained bundles. Run alone with
``python -m benchmarks.task_microscopy [--quick]``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks.task_brats import run_task
from benchmarks.timing import figure
from data_prep.shared import shared_data_dir

__all__ = ["NAME", "run"]

NAME = "task_microscopy"

QUICK = {
    "ae_channels": [8, 8, 8],
    "dm_channels": [8, 8, 8, 8],
    "dm_time_embed_dim": 16,
    "ae_epochs": 1,
    "ae_batch_size": 8,
    "ae_adversarial_start_iteration": 0,
    "ae_val_interval": 1,
    "dm_epochs": 1,
    "dm_batch_size": 8,
    "dm_divergence_aware_start_iteration": 2,
    "num_inference_steps": 3,
    "baseline_iterations": 4,
    "baseline_channels": [8, 8, 8, 8],
    "task_tile_size": 32,
    "task_stride": 64,
    "task_write_outputs": False,
}
FULL = {
    "ae_epochs": 100000,
    "dm_epochs": 100000,
    "ae_batch_size": 8,
    "ae_val_interval": 1000,
    "ae_adversarial_start_iteration": 200,
    "dm_divergence_aware_start_iteration": 200,
    "num_inference_steps": 50,
    "baseline_iterations": 10**9,
    "task_tile_size": 64,
}
TASKS = {
    "fly": {"target": "rhodamine", "conditions": ["fitc", "dapi"], "budget_s": {"ae": 120.0, "dm": 240.0}},
    "human": {"target": "ph3", "conditions": ["dna", "cellbody"], "budget_s": {"ae": 60.0, "dm": 120.0}},
}


def run(quick: bool = False) -> list[dict]:
    """Measure the figures (one note figure when the shared data is absent).

    Args:
        quick: the human field only, tiny.

    Returns:
        Figure records.
    """
    shared = shared_data_dir()
    root = None if shared is None else shared / "microscopy"
    if root is None or not root.is_dir():
        return [figure("task_microscopy: shared microscopy data absent, nothing measured", 0.0, "")]
    keep = os.environ.get("TASK_BENCH_KEEP")
    figs: list[dict] = []
    for name, task in TASKS.items():
        if quick and name != "human":
            continue
        settings = {**(QUICK if quick else FULL), "target": task["target"], "conditions": task["conditions"]}
        label = f"microscopy {name} {task['target']}"
        keep_dir = None if keep is None else str(Path(keep) / name)
        figs += run_task(
            label, "task_microscopy.json", root / name, settings, None if quick else task["budget_s"], keep_dir
        )
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

"""Cross-field microscopy channel prediction: ``rhodamine`` from ``fitc`` (anchor) and ``dapi`` on the two fly fields.

Each direction trains the task bundle (``train.json`` + ``task_microscopy.json``, field split with
``task_test_fields``) on 64 px tiles of one field for fixed iteration counts and evaluates the **whole other
field** by sliding-window inference (Gaussian blending), sampling with DDIM-25 (``damm_sampling``: within 0.3 dB
of DDIM-50 on the demo): DAMM gated per step and with the soft ``blend`` decision, uni, multi and the mean of 4
samples, the MONAI ``UNet``, each source channel mapped linearly and by histogram (the best single source channel),
and the target autoencoder's reconstruction (the ceiling). The protocol and the curve: :mod:`benchmarks.task_protocol`.

Both directions run in parallel, one thread each. ``quick=True``: one direction, 32 px tiles on a stride of 256 px, tiny
networks, a few iterations. Run alone with ``python -m benchmarks.task_microscopy [--quick]``;
``TASK_BENCH_KEEP=DIR`` keeps the trained bundles.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.task_protocol import curve_fractions, direction_figures, run_directions
from benchmarks.timing import figure
from data_prep.shared import shared_data_dir

__all__ = ["FULL", "NAME", "QUICK", "run"]

NAME = "task_microscopy"

FIELDS = ("POS002", "POS076")
TASK = {"target": "rhodamine", "conditions": ["fitc", "dapi"]}
QUICK = {
    "ae_channels": [8, 8, 8],
    "dm_channels": [8, 8, 8, 8],
    "dm_time_embed_dim": 16,
    "ae_iterations": 4,
    "ae_batch_size": 8,
    "ae_adversarial_start_iteration": 0,
    "ae_val_interval": 1,
    "dm_iterations": 4,
    "dm_batch_size": 8,
    "dm_snapshot_fractions": [0.5],
    "num_inference_steps": 3,
    "baseline_iterations": 4,
    "baseline_channels": [8, 8, 8, 8],
    "task_tile_size": 32,
    "task_stride": 256,
    "task_eval_branches": ["damm", "uni", "multi", "damm_mean2"],
    "task_write_outputs": False,
}
FULL = {
    "ae_shared": True,
    "ae_iterations": 800,
    "ae_batch_size": 8,
    "ae_val_interval": 1000,
    "ae_adversarial_start_iteration": 200,
    "dm_iterations": 2400,
    "dm_batch_size": 16,
    "dm_divergence_aware_start_fraction": 0.5,
    "dm_ema_decay": 0.999,
    "dm_snapshot_fractions": [0.25, 0.5],
    "num_inference_steps": 25,
    "baseline_iterations": 1600,
    "task_tile_size": 64,
    "task_eval_branches": ["damm", "damm_blend", "uni", "multi", "damm_mean4"],
    "task_write_outputs": False,
}


def run(quick: bool = False) -> list[dict]:
    """Measure both directions (one note figure when the shared data is absent).

    Args:
        quick: tiny settings.

    Returns:
        Figure records.
    """
    shared = shared_data_dir()
    data = None if shared is None else shared / "microscopy" / "fly"
    if data is None or not all((data / f"{f}_{c}.tif").is_file() for f in FIELDS for c in ("dapi", "fitc")):
        return [figure("task_microscopy: shared fly fields absent, nothing measured", 0.0, "")]
    settings = {**(QUICK if quick else FULL), **TASK, "dataset_dir": str(data)}
    keep = os.environ.get("TASK_BENCH_KEEP")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(keep) if keep else Path(tmp)
        jobs = [
            {
                "overlay": "task_microscopy.json",
                "root": str(base / f"{src}_to_{dst}"),
                "settings": {**settings, "task_test_fields": [dst]},
                "label": f"microscopy fly rhodamine {src} -> {dst}",
                "fractions": curve_fractions(settings),
                "threads": 1,
            }
            for src, dst in ((FIELDS, FIELDS[::-1])[:1] if quick else (FIELDS, FIELDS[::-1]))
        ]
        results = run_directions(jobs, parallel=not quick)
    figs = []
    for res in results:
        figs += direction_figures(res, "field")
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

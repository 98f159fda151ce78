"""Cross-subject BraTS FLAIR synthesis from T2 (anchor), T1 and T1c: train on one patient, evaluate the other.

The shared data holds two different patients: a glioma (``brats/TCGA-DU-7294``, LPS, with a tumour label) and a
metastasis (``brats_validation/AURORA-example``, RAS). Each direction trains the task bundle (``train.json`` +
``task_brats.json``) on one subject's axial slices (autoencoders, diffusion, the MONAI ``UNet`` baseline, the
trivial baselines) for fixed iteration counts and evaluates the whole brain of the other subject on its input grid
(brain-masked PSNR / SSIM / MAE, and the tumour when labelled): DAMM gated, uni, multi and the mean of 4 samples,
the UNet, each source modality mapped linearly and by histogram, and the target autoencoder's reconstruction
(the ceiling). The protocol and the curve: :mod:`benchmarks.task_protocol`.

Full run (:data:`FULL`): the data's own 1 mm grid, one autoencoder shared by the four contrasts (4x in-plane
downsampling) trained on random 128 px crops (``ae_crop_size``), the denoiser trained on random latent windows of
the same 128 px (``dm_crop_size``) and sampling whole slices with DDIM-25; both directions in parallel, one thread
each. :data:`FULL_2MM` is the earlier recipe (2 mm voxels, whole slices, DDIM-50; the resampling to 2 mm and back
alone limits its brain PSNR on the 1 mm input grid, which the ``true FLAIR resampled to 2 mm and back`` figures
measure when it runs), kept for the checks measured with it (``damm_gate_brats``, ``task_brats_autoencoder``).
``quick=True``: one direction, 4 mm, tiny networks, a few iterations. Run alone with
``python -m benchmarks.task_brats [--quick]``; ``TASK_BENCH_KEEP=DIR`` keeps the trained bundles.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.task_protocol import curve_fractions, direction_figures, run_directions
from benchmarks.timing import figure
from data_prep.shared import shared_data_dir

__all__ = ["FULL", "FULL_2MM", "NAME", "QUICK", "direction_jobs", "run", "shared_subjects", "write_datalist"]

NAME = "task_brats"

MODALITIES = ("flair", "t2", "t1", "t1c", "seg")
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
    "task_pixdim": [4, 4, 4],
    "dm_crop_size": [32, 32],
    "task_eval_branches": ["damm", "uni", "multi", "damm_mean2"],
    "task_write_outputs": False,
}
FULL_2MM = {
    "ae_shared": True,
    "ae_iterations": 1200,
    "ae_batch_size": 8,
    "ae_val_interval": 1000,
    "ae_adversarial_start_iteration": 300,
    "dm_iterations": 3000,
    "dm_batch_size": 16,
    "dm_divergence_aware_start_fraction": 0.5,
    "dm_ema_decay": 0.999,
    "dm_snapshot_fractions": [0.25, 0.5],
    "num_inference_steps": 50,
    "baseline_iterations": 2000,
    "task_pixdim": [2, 2, 2],
    "task_eval_branches": ["damm", "uni", "multi", "damm_mean4"],
    "task_write_outputs": False,
}
#: the full run: 1 mm, the shared 4x autoencoder and the denoiser on 128 px crops (the autoencoder lever of
#: ``benchmarks.task_brats_autoencoder``: a 27.07 dB ceiling after 600 iterations, 27.27 dB after 1200, against
#: 22.77 dB at 2 mm; 600 iterations keep a direction within the time target), DDIM-25 (``damm_sampling``: within
#: 0.3 dB of DDIM-50 on the demo), and the soft gate beside the per-step one
FULL = {
    **FULL_2MM,
    "ae_iterations": 600,
    "task_pixdim": None,
    "ae_crop_size": [128, 128],
    "dm_crop_size": [128, 128],
    "num_inference_steps": 25,
    "task_eval_branches": ["damm", "damm_blend", "uni", "multi", "damm_mean4"],
}


def _subject(folder: Path, name: str) -> dict[str, Any]:
    return {
        "subject": name,
        **{m: str(folder / f"{m}.nii.gz") for m in MODALITIES if (folder / f"{m}.nii.gz").is_file()},
    }


def write_datalist(train: dict[str, Any], test: dict[str, Any], path: Path) -> Path:
    """Write a one-subject-each ``{"training": [train], "test": [test]}`` datalist to ``path`` (parents made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": [train], "test": [test]}, indent=2))
    return path


def direction_jobs(
    subjects: dict[str, dict[str, Any]], settings: dict[str, Any], base: Path, quick: bool, prefix: str = ""
) -> list[dict[str, Any]]:
    """The :func:`benchmarks.task_protocol.run_direction` jobs of both directions (``quick``: the first only), each
    with its datalist written under ``base / f"{prefix}{src}_to_{dst}"``.

    Args:
        subjects: :func:`shared_subjects`.
        settings: the bundle overrides of every job.
        base: folder of the trained bundles.
        quick: one direction (a plumbing check).
        prefix: prefix of the bundles' folder names.

    Returns:
        Jobs, one thread each.
    """
    directions = (("glioma", "metastasis"), ("metastasis", "glioma"))
    jobs = []
    for src, dst in directions[:1] if quick else directions:
        root = base / f"{prefix}{src}_to_{dst}"
        datalist = write_datalist(subjects[src], subjects[dst], root / "datalist.json")
        jobs.append(
            {
                "overlay": "task_brats.json",
                "root": str(root),
                "settings": {**settings, "datalist": str(datalist)},
                "label": f"brats flair {src} -> {dst}",
                "fractions": curve_fractions(settings),
                "threads": 1,
            }
        )
    return jobs


def _resampling_limit(test: dict[str, Any], pixdim: Any) -> dict[str, float]:
    """Brain metrics of the true FLAIR taken to the training grid and back (what any 2D model at ``pixdim`` is
    limited to on the input grid)."""
    from damm.tasks.brats_subject import prepare_subject, synthesise_subject, voxels
    from damm.tasks.metrics import region_metrics, to_unit

    files = {k: test[k] for k in ("t2", "t1", "t1c", "flair")}
    prep = prepare_subject(files, ["t2", "t1", "t1c"], "flair", test["subject"], pixdim=pixdim)
    vol = synthesise_subject(prep, lambda x: x, prep.target_params, use_target=True)
    lo, hi = prep.target_params["lower"], prep.target_params["upper"]
    truth = to_unit(voxels(files["flair"], "flair"), lo, hi)
    return region_metrics(to_unit(vol, lo, hi), truth, {"brain": prep.input_brain})["brain"]


def shared_subjects() -> dict[str, dict[str, Any]] | None:
    """The two shared patients as datalist items, ``{"glioma": ..., "metastasis": ...}`` (``None`` when absent)."""
    shared = shared_data_dir()
    if shared is None:
        return None
    a, b = shared / "brats" / "TCGA-DU-7294", shared / "brats_validation" / "AURORA-example"
    if not a.is_dir() or not b.is_dir():
        return None
    return {"glioma": _subject(a, "glioma"), "metastasis": _subject(b, "metastasis")}


def run(quick: bool = False) -> list[dict]:
    """Measure both directions (one note figure when the shared data is absent).

    Args:
        quick: 4 mm, tiny networks, a few iterations.

    Returns:
        Figure records.
    """
    subjects = shared_subjects()
    if subjects is None:
        return [figure("task_brats: shared BraTS subjects absent, nothing measured", 0.0, "")]
    settings = QUICK if quick else FULL
    keep = os.environ.get("TASK_BENCH_KEEP")
    with tempfile.TemporaryDirectory() as tmp:
        jobs = direction_jobs(subjects, settings, Path(keep) if keep else Path(tmp), quick)
        results = run_directions(jobs, parallel=not quick)
    figs = []
    for res in results:
        figs += direction_figures(res, "brain")
    for name in ("glioma", "metastasis") if settings.get("task_pixdim") else ():  # input grid: nothing resampled
        lim = _resampling_limit(subjects[name], settings["task_pixdim"])
        for metric, unit in (("psnr", "dB"), ("ssim", "")):
            figs.append(
                figure(
                    f"brats flair {name}: true FLAIR resampled to {settings['task_pixdim'][0]} mm and back, brain "
                    f"{metric.upper()}",
                    lim[metric],
                    unit,
                    subject=name,
                    metric=metric,
                    pixdim=settings["task_pixdim"],
                )
            )
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

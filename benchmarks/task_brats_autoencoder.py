"""The autoencoder levers of the BraTS recipe, measured by the FLAIR reconstruction ceiling on the unseen subject:
one autoencoder shared by all four MRI contrasts against one per contrast (the paper) at the task's 2 mm, and the
shared autoencoder at the data's own 1 mm trained on random 128 px crops (``ae_crop_size``), with its ceiling after
a series of iteration budgets (one run, resumed from its checkpoint at each budget).

Trains stage 1 of the task bundle (``train.json`` + ``task_brats.json``) on the glioma subject (the arms in
parallel, one thread each) and reconstructs the whole brain of the metastasis subject's true FLAIR with each
(``damm.tasks.common.AutoencoderCeiling``), on its input grid (1 mm), brain-masked, as the task evaluation does.
At 2 mm the ceiling is bounded by the resampling to 2 mm and back (the ``true FLAIR resampled`` figures of
``task_brats``); at 1 mm nothing is resampled. Settings: :data:`benchmarks.task_brats.FULL_2MM` and :data:`ARMS`.
Run alone with ``python -m benchmarks.task_brats_autoencoder [--quick]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.task_brats import FULL_2MM, QUICK, shared_subjects, write_datalist
from benchmarks.task_protocol import CONFIGS, bundle_default
from benchmarks.timing import figure

__all__ = ["ARMS", "NAME", "arm_figures", "run"]

NAME = "task_brats_autoencoder"

AE_KEYS = ("ae_channels", "ae_iterations", "ae_batch_size", "ae_val_interval", "ae_adversarial_start_iteration",
           "task_pixdim")  # fmt: skip
#: the arms: a label, the overrides of the base settings, and the iteration budgets measured in one resumed run
#: (``None``: the base ``ae_iterations`` only).
AE_CHANNELS = bundle_default("ae_channels")  # the bundle's 4x autoencoder
ARMS = (
    {"label": "one shared autoencoder", "settings": {"ae_shared": True, "ae_channels": AE_CHANNELS}, "budgets": None},
    {
        "label": "one autoencoder per contrast",
        "settings": {"ae_shared": False, "ae_channels": AE_CHANNELS},
        "budgets": None,
    },
    {
        "label": "one shared autoencoder at 1 mm on 128 px crops",
        "settings": {"ae_shared": True, "ae_channels": AE_CHANNELS, "task_pixdim": None, "ae_crop_size": [128, 128]},
        "budgets": [300, 600, 1200],
    },
    {
        # 8x in-plane downsampling: at 1 mm its latents have the size of the 4x latents of the 2 mm recipe
        "label": "one shared 8x autoencoder at 1 mm on 128 px crops",
        "settings": {
            "ae_shared": True,
            "ae_channels": [16, 32, 32, 64],
            "task_pixdim": None,
            "ae_crop_size": [128, 128],
        },
        "budgets": [300, 600, 1200],
    },
)
QUICK_ARMS = (
    {"label": "one shared autoencoder", "settings": {"ae_shared": True}, "budgets": None},
    {
        "label": "one shared autoencoder on 16 px crops",
        "settings": {"ae_shared": True, "ae_crop_size": [16, 16]},
        "budgets": [2, 4],
    },
)


def _train_and_measure(job: dict[str, Any]) -> dict[str, Any]:
    """Train one arm to each of its budgets in turn (resuming from the last checkpoint) and measure the ceiling."""
    import time

    import torch
    from monai.bundle import ConfigWorkflow

    from damm.model import load_autoencoders
    from damm.stages import read_training_times
    from damm.tasks.brats_subject import synthesise_subject, voxels
    from damm.tasks.common import AutoencoderCeiling
    from damm.tasks.metrics import region_metrics, to_unit

    torch.set_num_threads(1)
    root = Path(job["root"])
    test = job["test"]
    points, seconds = [], 0.0
    for budget in job["budgets"]:
        wf = ConfigWorkflow(
            config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train.json"), str(CONFIGS / "task_brats.json")],
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=str(CONFIGS / "logging.conf"),
            run_id="train_autoencoder",
            workflow_type="train",
            bundle_root=str(root),
            progress=False,
            log_every=1000,
            num_threads=1,
            **{**job["settings"], "ae_iterations": budget},
        )
        wf.initialize()
        final = Path(wf.parser.get_parsed_content("ae_final_path"))
        t0 = time.perf_counter()
        wf.run()  # a larger budget than the recorded one: the stage resumes from its last checkpoint
        seconds += time.perf_counter() - t0
        trained = read_training_times(final.parent).get("stage 1 (autoencoders)", {}).get("iterations")
        if trained != budget:
            raise RuntimeError(f"{job['label']}: stage 1 trained {trained} iterations, expected the budget {budget}")
        aes = load_autoencoders(wf.parser.get_parsed_content("autoencoders"), final)
        task = wf.parser.get_parsed_content("task#data")
        prep = task.prepare({k: test[k] for k in ("t2", "t1", "t1c", "flair")}, test["subject"])
        vol = synthesise_subject(prep, AutoencoderCeiling(aes["flair"]), prep.target_params, task.multiple, True)
        wf.finalize()
        lo, hi = prep.target_params["lower"], prep.target_params["upper"]
        truth = to_unit(voxels(test["flair"], "flair"), lo, hi)
        metrics = region_metrics(to_unit(vol, lo, hi), truth, {"brain": prep.input_brain})["brain"]
        points.append({"iterations": budget, "seconds": seconds, "metrics": metrics})
    n_params = sum(p.numel() for p in aes.parameters())
    return {"label": job["label"], "settings": job["settings"], "points": points, "parameters": n_params}


def run(quick: bool = False) -> list[dict]:
    """Measure both variants (one note figure when the shared data is absent).

    Args:
        quick: tiny settings.

    Returns:
        Figure records.
    """
    subjects = shared_subjects()
    if subjects is None:
        return [figure("task_brats_autoencoder: shared BraTS subjects absent, nothing measured", 0.0, "")]
    base = QUICK if quick else FULL_2MM
    settings = {k: base[k] for k in AE_KEYS if k in base}
    train, test = subjects["glioma"], subjects["metastasis"]
    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_datalist(train, test, Path(tmp) / "datalist.json")
        jobs = [
            {"root": str(Path(tmp) / f"arm{i}"), "test": test, "label": arm["label"],
             "budgets": arm["budgets"] or [settings["ae_iterations"]],
             "settings": {**settings, **arm["settings"], "datalist": str(datalist)}}
            for i, arm in enumerate(QUICK_ARMS if quick else ARMS)
        ]  # fmt: skip
        if quick:
            results = [_train_and_measure(j) for j in jobs]
        else:  # the longest arm (most iterations) first, so the others share the second worker
            jobs.sort(key=lambda j: -max(j["budgets"]))
            with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
                results = list(pool.map(_train_and_measure, jobs))
    return [f for res in results for f in arm_figures(res)]


def arm_figures(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures of one arm: brain PSNR / SSIM and the stage-1 time at every budget (the last budget's figures
    carry no ``budget_fraction``; earlier ones do, for the quality-against-iterations curve).

    Args:
        res: :func:`_train_and_measure`'s result.

    Returns:
        Figure records.
    """
    s = {k: v for k, v in res["settings"].items() if k != "datalist"}
    final = res["points"][-1]["iterations"]
    common = {"direction": "glioma -> metastasis", "parameters": res["parameters"], **s}
    figs = []
    for point in res["points"]:
        at = {**common, "ae_iterations": point["iterations"]}
        suffix = ""
        if point["iterations"] != final:
            at["budget_fraction"] = round(point["iterations"] / final, 4)
            suffix = f" after {point['iterations']} iterations"
        for metric, unit in (("psnr", "dB"), ("ssim", "")):
            figs.append(
                figure(f"brats FLAIR ceiling on the unseen subject, {res['label']}{suffix}: brain {metric.upper()}",
                       point["metrics"][metric], unit, metric=metric, **at)
            )  # fmt: skip
        figs.append(figure(f"brats stage 1 training time, {res['label']}{suffix}", point["seconds"], "s", **at))
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

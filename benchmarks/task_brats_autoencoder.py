"""The autoencoder lever of the BraTS recipe: one autoencoder shared by all four MRI contrasts against one per
contrast (the paper), at the same iteration budget, measured by the FLAIR reconstruction ceiling on the unseen
subject.

Trains stage 1 of the task bundle (``train.json`` + ``task_brats.json``) on the glioma subject with
``ae_shared`` true and false (in parallel, one thread each) and reconstructs the whole brain of the metastasis
subject's true FLAIR with each (``damm.tasks.common.AutoencoderCeiling``), on its input grid, brain-masked, as
the task evaluation does. Settings: :data:`benchmarks.task_brats.FULL` (2 mm). Run alone with
``python -m benchmarks.task_brats_autoencoder [--quick]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.task_brats import FULL, QUICK, shared_subjects, write_datalist
from benchmarks.task_protocol import CONFIGS
from benchmarks.timing import figure

__all__ = ["NAME", "run"]

NAME = "task_brats_autoencoder"

AE_KEYS = ("ae_channels", "ae_iterations", "ae_batch_size", "ae_val_interval", "ae_adversarial_start_iteration",
           "task_pixdim")  # fmt: skip


def _train_and_measure(job: dict[str, Any]) -> dict[str, Any]:
    import time

    import torch
    from monai.bundle import ConfigWorkflow

    from damm.model import load_autoencoders
    from damm.tasks.brats_subject import synthesise_subject, voxels
    from damm.tasks.common import AutoencoderCeiling
    from damm.tasks.metrics import region_metrics, to_unit

    torch.set_num_threads(1)
    root = Path(job["root"])
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
        **job["settings"],
    )
    wf.initialize()
    t0 = time.perf_counter()
    wf.run()
    seconds = time.perf_counter() - t0
    aes = load_autoencoders(wf.parser.get_parsed_content("autoencoders"), wf.parser.get_parsed_content("ae_final_path"))
    task = wf.parser.get_parsed_content("task#data")
    test = job["test"]
    prep = task.prepare({k: test[k] for k in ("t2", "t1", "t1c", "flair")}, test["subject"])
    vol = synthesise_subject(prep, AutoencoderCeiling(aes["flair"]), prep.target_params, task.multiple, True)
    wf.finalize()
    lo, hi = prep.target_params["lower"], prep.target_params["upper"]
    truth = to_unit(voxels(test["flair"], "flair"), lo, hi)
    metrics = region_metrics(to_unit(vol, lo, hi), truth, {"brain": prep.input_brain})["brain"]
    n_params = sum(p.numel() for p in aes.parameters())
    return {"shared": job["settings"]["ae_shared"], "seconds": seconds, "metrics": metrics, "parameters": n_params}


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
    base = QUICK if quick else FULL
    settings = {k: base[k] for k in AE_KEYS if k in base}
    train, test = subjects["glioma"], subjects["metastasis"]
    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_datalist(train, test, Path(tmp) / "datalist.json")
        jobs = [
            {"root": str(Path(tmp) / f"shared_{s}"), "test": test,
             "settings": {**settings, "ae_shared": s, "datalist": str(datalist)}}
            for s in (True, False)
        ]  # fmt: skip
        if quick:
            results = [_train_and_measure(j) for j in jobs]
        else:
            with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
                results = list(pool.map(_train_and_measure, jobs))
    figs = []
    for res in results:
        variant = "one shared autoencoder" if res["shared"] else "one autoencoder per contrast"
        common = {"ae_shared": res["shared"], "direction": "glioma -> metastasis", "parameters": res["parameters"],
                  **settings}  # fmt: skip
        for metric, unit in (("psnr", "dB"), ("ssim", "")):
            figs.append(
                figure(f"brats FLAIR ceiling on the unseen subject, {variant}: brain {metric.upper()}",
                       res["metrics"][metric], unit, metric=metric, **common)
            )  # fmt: skip
        figs.append(figure(f"brats stage 1 training time, {variant}", res["seconds"], "s", **common))
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

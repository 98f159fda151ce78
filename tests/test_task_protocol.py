"""The cross-subject protocol end to end on two tiny synthetic subjects: train on one, evaluate the whole other,
with the UNet, the trivial baselines, the K-sample mean, the snapshots of the curve and the EMA comparison
(``benchmarks.task_protocol``, the code of the task benchmarks)."""

from __future__ import annotations

import json

import pytest

from benchmarks.task_protocol import curve_fractions, direction_figures, run_direction
from tests.test_task_baselines import _subject
from tests.tiny_bundle import TINY_NET

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SETTINGS = {
    **TINY_NET,
    "ae_norm_num_groups": 8,
    "ae_iterations": 3,
    "ae_batch_size": 4,
    "ae_adversarial_start_iteration": 0,
    "ae_disc_layers": 2,
    "ae_val_interval": 1,
    "dm_iterations": 4,
    "dm_batch_size": 4,
    "dm_snapshot_fractions": [0.5],
    "baseline_iterations": 4,
    "baseline_channels": [8, 8, 8, 8],
    "baseline_batch_size": 4,
    "num_inference_steps": 2,
    "eval_batch_size": 16,
    "task_eval_branches": ["damm", "uni", "damm_mean2"],
    "task_write_outputs": False,
    "task_gap_mm": 1.0,
}


def test_cross_subject_direction_end_to_end(tmp_path):
    train = _subject(tmp_path / "data" / "A", seed=0)
    test = _subject(tmp_path / "data" / "B", seed=1, shape=(26, 28, 12))
    modalities = ("flair", "t2", "t1", "t1c")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "training": [{"subject": "A", **{m: str(train / f"{m}.nii.gz") for m in modalities}}],
                "test": [{"subject": "B", **{m: str(test / f"{m}.nii.gz") for m in modalities}}],
            }
        )
    )
    settings = {**SETTINGS, "datalist": str(datalist)}
    root = tmp_path / "run"
    result = run_direction(
        {
            "overlay": "task_brats.json",
            "root": str(root),
            "settings": settings,
            "label": "tiny A -> B",
            "fractions": curve_fractions(settings),
            "threads": 1,
        }
    )
    final = result["final"]
    assert final["split_mode"] == "subjects" and list(final["subjects"]) == ["B"]  # only the unseen subject
    methods = set(final["mean"])
    assert {"autoencoder_ceiling", "damm", "uni", "damm_mean2", "unet_baseline"} <= methods
    assert {f"copy_{c}_{k}" for c in ("t2", "t1", "t1c") for k in ("linear", "histogram")} <= methods
    # the budgets are iteration counts: snapshots at their iteration, the final model, the curve point
    models = root / "models"
    assert (models / "model_iteration=2.pt").is_file() and (models / "baseline_unet_iteration=2.pt").is_file()
    assert list(result["curve"]) == ["0.5"] and result["raw_denoiser"] is not None
    figs = direction_figures(result, "brain")
    ranks = sorted(f["params"]["rank"] for f in figs if f["params"].get("metric") == "ssim" and "rank" in f["params"])
    assert ranks == list(range(1, len(methods) + 1))  # every method ranked once
    fractions = {f["params"]["budget_fraction"] for f in figs if "budget_fraction" in f["params"]}
    assert fractions == {0.5, 1.0}


def test_autoencoder_arm_figures_curve_and_table():
    from benchmarks.tables import _autoencoder_lever
    from benchmarks.task_brats_autoencoder import arm_figures

    def point(iterations, psnr, seconds):
        return {"iterations": iterations, "seconds": seconds, "metrics": {"psnr": psnr, "ssim": psnr / 40}}

    res = {
        "label": "one shared 8x autoencoder at 1 mm on 128 px crops",
        "settings": {"ae_shared": True, "ae_channels": [16, 32, 32, 64], "task_pixdim": None,
                     "ae_crop_size": [128, 128], "datalist": "datalist.json"},
        "points": [point(300, 24.0, 60.0), point(1200, 28.0, 240.0)],
        "parameters": 1234,
    }  # fmt: skip
    figs = arm_figures(res)
    assert len(figs) == 6 and all("datalist" not in f["params"] for f in figs)
    early = [f for f in figs if "after 300 iterations" in f["name"]]
    assert len(early) == 3 and all(f["params"]["budget_fraction"] == 0.25 for f in early)
    final = {f["name"]: f for f in figs if "budget_fraction" not in f["params"]}
    psnr = final[
        "brats FLAIR ceiling on the unseen subject, one shared 8x autoencoder at 1 mm on 128 px crops: brain PSNR"
    ]
    assert psnr["value"] == 28.0 and psnr["params"]["ae_iterations"] == 1200
    rows = _autoencoder_lever({"figures": figs}).splitlines()[2:]
    arm = "| one shared by all contrasts | 8x | input grid (1 mm) | 128 px crops"
    assert rows == [
        f"{arm} | 300 | 1234 | 24.00 | 0.600 | 1.0 min |",
        f"{arm} | 1200 | 1234 | 28.00 | 0.700 | 4.0 min |",
    ]

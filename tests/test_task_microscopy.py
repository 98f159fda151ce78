"""Microscopy task: region split, tiny bundle training on a real field, whole-field sliding-window inference
(TIFF of the input size and dtype), metrics on the held-out part, and bad input (tiny: 32 px tiles, 3 steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigWorkflow

from damm.outputs import to_input_scale
from damm.tasks.microscopy import MicroscopyTaskData, load_field, predict_field

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"

TINY = {
    "ae_channels": [8, 8, 8],
    "ae_norm_num_groups": 8,
    "dm_channels": [8, 8, 8, 8],
    "dm_time_embed_dim": 16,
    "ae_iterations": 2,
    "ae_batch_size": 8,
    "ae_adversarial_start_iteration": 0,
    "ae_disc_layers": 2,
    "ae_val_interval": 1,
    "dm_iterations": 2,
    "dm_batch_size": 8,
    "dm_divergence_aware_start_iteration": 1,
    "num_inference_steps": 3,
    "eval_batch_size": 64,
    "baseline_iterations": 2,
    "baseline_channels": [8, 8, 8, 8],
    "progress": False,
    "log_every": 1,
    # human field (512 x 512): ph3 from dna (anchor) and cellbody, 32 px tiles every 64 px
    "target": "ph3",
    "conditions": ["dna", "cellbody"],
    "task_tile_size": 32,
    "task_stride": 64,
    "task_heldout_fraction": 0.2,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def human_dir(shared_data) -> Path:
    path = shared_data / "microscopy" / "human"
    if not (path / "ph3.tif").is_file():
        pytest.skip("shared microscopy field not found")
    return path


def _run(root: Path, data: Path, run_id: str, **extra) -> None:
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train.json"), str(CONFIGS / "task_microscopy.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id=run_id,
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(data),
        **{**TINY, **extra},
    )
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, human_dir) -> Path:
    root = tmp_path_factory.mktemp("microscopy_bundle")
    _run(root, human_dir, "train_baseline")
    _run(root, human_dir, "training")
    return root


def _field(folder: Path, shapes: dict[str, tuple[int, int]], dtype=np.uint8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        tifffile.imwrite(folder / f"{name}.tif", rng.integers(0, 200, size=shape).astype(dtype))
    return folder


def test_region_split_keeps_heldout_columns_out_of_training(tmp_path):
    field = _field(tmp_path / "f", {"a": (64, 160), "b": (64, 160), "c": (64, 160)})
    task = MicroscopyTaskData(tmp_path / "f", target="c", conditions=["a", "b"], tile_size=32, heldout_fraction=0.25)
    assert task.resolved_split_mode() == "region"
    assert task.heldout_columns(160) == (104, 120)  # 40 held-out columns, 16-column gap
    train, test = task.items("training"), task.items("test")
    assert max(it["x"] for it in train) + 32 <= 104
    assert min(it["x"] for it in test) >= 120
    assert {tuple(it["c"].shape) for it in train} == {(1, 32, 32)}
    ref = load_field({k: field / f"{k}.tif" for k in "abc"}, list("abc"))[0]["c"]
    it = train[0]
    torch.testing.assert_close(it["c"], ref[:, it["y"] : it["y"] + 32, it["x"] : it["x"] + 32])


def test_bad_fields_fail_clearly(tmp_path):
    _field(tmp_path / "f", {"a": (64, 96), "b": (64, 96), "c": (64, 80)})
    task = MicroscopyTaskData(tmp_path / "f", target="c", conditions=["a", "b"], tile_size=32)
    with pytest.raises(
        ValueError, match=r"channels \['c'\] are not on the grid.*shape of 'c' \(64, 80\).*c: c\.tif shape=\(64, 80\)"
    ):
        task.check()
    with pytest.raises(ValueError, match="divisible"):
        MicroscopyTaskData(tmp_path / "f", target="c", conditions=["a", "b"], tile_size=40, multiple=16)
    with pytest.raises(ValueError, match="missing channels"):
        load_field({"a": tmp_path / "f" / "a.tif"}, ["a", "b"])


def test_sliding_window_blends_to_whole_field():
    x = torch.linspace(-1, 1, 70 * 90).reshape(1, 70, 90)
    calls = []

    def predictor(w):
        calls.append(w.shape[0])
        return w[:, :1]

    out = predict_field(predictor, [x], tile_size=32, overlap=0.5, sw_batch_size=4)
    assert out.shape == (1, 70, 90)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)  # identity windows blend back exactly
    assert max(calls) <= 4 and len(calls) > 1
    y = to_input_scale(torch.tensor([[-1.0, 0.0, 1.0, 3.0]]), {"lower": 10.0, "upper": 250.0}, "uint8")
    assert y.dtype == np.uint8 and y.tolist() == [[10, 130, 250, 255]]
    assert to_input_scale(torch.tensor([[-1.0, 0.0, 1.0, 3.0]]), (10.0, 250.0), "uint8").tolist() == y.tolist()


def test_training_and_heldout_evaluation(trained):
    ref = json.loads((trained / "models" / "target_intensity.json").read_text())
    assert ref["modality"] == "ph3" and ref["upper"] > ref["lower"]
    res = json.loads((trained / "eval" / "task" / "task_evaluation.json").read_text())
    assert res["split_mode"] == "region"
    methods = res["subjects"]["human"]["methods"]
    trivial = {f"copy_{c}_{k}" for c in ("dna", "cellbody") for k in ("linear", "histogram")}
    assert set(methods) == {"autoencoder_ceiling", "damm", "uni", "multi", "unet_baseline", *trivial}
    n = 512 * round(512 * 0.2)
    for rec in methods.values():
        assert rec["heldout"]["n_voxels"] == n
        assert np.isfinite(rec["heldout"]["psnr"]) and 0 <= rec["heldout"]["mae"] <= 1
    assert 0.0 <= methods["damm"]["branch_statistics"]["multi_step_fraction"] <= 1.0


def test_whole_field_inference_writes_input_size_and_dtype(trained, human_dir):
    _run(trained, human_dir, "inference")
    out = trained / "eval" / "inference" / "human_ph3.tif"
    pred = tifffile.imread(out)
    src = tifffile.imread(human_dir / "dna.tif")
    assert pred.shape == src.shape == (512, 512) and pred.dtype == src.dtype
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["synthetic"] and side["steps"] == 3 and side["tile_size"] == 32
    with pytest.raises(RuntimeError) as err:  # outputs are never silently replaced
        _run(trained, human_dir, "inference")
    assert isinstance(err.value.__cause__, FileExistsError) and "exists" in str(err.value.__cause__)


def _untrained_model(root: Path, config_files: list[str], overrides: dict) -> None:
    """An untrained model.pt of the configured architecture (inference plumbing, not quality, is under test)."""
    from monai.bundle import ConfigParser

    from damm.model import export_model

    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update({"bundle_root": str(root), **overrides})
    export_model(parser.get_parsed_content("network_def"), root / "models" / "model.pt")


def test_standalone_inference_overlay_without_the_target(tmp_path):
    """inference.json + task_microscopy.json synthesise a whole field that has no target channel."""
    configs = [str(CONFIGS / n) for n in ("common.json", "inference.json", "task_microscopy.json")]
    root = tmp_path / "bundle"
    settings = {k: TINY[k] for k in ("ae_channels", "ae_norm_num_groups", "dm_channels", "dm_time_embed_dim")}
    settings.update(target="ph3", conditions=["dna", "cellbody"], task_tile_size=32, num_inference_steps=3)
    _untrained_model(root, configs, settings)
    (root / "models" / "target_intensity.json").write_text(
        json.dumps({"modality": "ph3", "lower": 5.0, "upper": 200.0})
    )
    field = _field(tmp_path / "plate1", {"dna": (48, 80), "cellbody": (48, 80)})  # no ph3.tif
    wf = ConfigWorkflow(
        config_file=configs,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id="inference",
        workflow_type="infer",
        bundle_root=str(root),
        dataset_dir=str(field),
        progress=False,
        **settings,
    )
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    (out,) = (root / "eval" / "inference" / "inference").glob("*_ph3.tif")
    pred = tifffile.imread(out)
    assert pred.shape == (48, 80) and pred.dtype == np.uint8
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["intensity_mapping"]["source"].endswith("target_intensity.json")
    assert side["intensity_mapping"]["lower"] == 5.0 and side["intensity_mapping"]["upper"] == 200.0
    assert set(side["inputs"]) == {"dna", "cellbody"}
    with pytest.raises(ValueError, match="no field has all channels"):  # training still needs the target
        MicroscopyTaskData(field, target="ph3", conditions=["dna", "cellbody"], tile_size=32).items("training")

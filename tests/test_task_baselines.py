"""Baselines as products (issue 20): trivial baselines (hand-computed fits, predictor, JSON round trip), the UNet and
trivial baselines through ``python -m damm.tasks.impute --method`` on tiny synthetic BraTS subjects (same file and
sidecar as DAMM, no DAMM model loaded), the missing-file message, and outputs clamped to the stated range."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from tiny_bundle import TINY_NET

from damm.tasks.baseline import train_baseline_stage
from damm.tasks.brats import BraTSTaskData
from damm.tasks.impute import impute, main
from damm.tasks.microscopy import MicroscopyTaskData, synthesise_field_to_file
from damm.tasks.protocol import synthesise_to_file
from damm.tasks.trivial import (
    TrivialPredictor,
    fit_linear,
    fit_trivial_baselines,
    fit_trivial_stage,
    trivial_predictors,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
CONFIG_FILES = [str(CONFIGS / "common.json"), str(CONFIGS / "train.json"), str(CONFIGS / "task_brats.json")]
CONDITIONS = ["t2", "t1", "t1c"]
#: what the impute calls repeat (the architecture of the untrained DAMM model and the UNet's channels)
SETTINGS = {**TINY_NET, "baseline_channels": [8, 8, 8, 8], "eval_batch_size": 16}

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ trivial fits
def _item(**images: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(1, 1, -1) for k, v in images.items()}


def test_linear_fit_is_exact_on_a_line_and_ignores_background(tmp_path):
    target = np.array([-0.625, -0.5, -0.25, 0.0, 0.125, 0.25, -1.0, -1.0, 0.125])  # exact in float32
    source = 2.0 * target + 0.5  # target = 0.5 * source - 0.25
    source[6] = -1.0  # background in both: not fitted
    source[7] = 0.9  # target background only: not fitted
    source[8] = -1.0  # source background only: not fitted
    params = fit_trivial_baselines([_item(t2=source, flair=target)], ["t2"], "flair", tmp_path / "p.json")
    rec = params["mappings"]["t2"]
    assert rec["n_pixels"] == 6
    assert rec["linear"]["a"] == pytest.approx(0.5, abs=1e-12) and rec["linear"]["b"] == pytest.approx(-0.25, abs=1e-12)
    every = fit_trivial_baselines([_item(t2=source, flair=target)], ["t2"], "flair", tmp_path / "q.json", "all")
    assert every["mappings"]["t2"]["n_pixels"] == 9 and every["foreground"] == "all"
    # Huber: one wild pixel among 20 on the line barely moves it; least squares would tilt
    s = np.linspace(-0.9, 0.9, 21)
    t = 0.5 * s - 0.25
    t[-1] += 1.0
    huber = fit_linear(s, t)
    ols = np.polyfit(s, t, 1)
    assert abs(huber["a"] - 0.5) < 0.01 and abs(huber["b"] + 0.25) < 0.01
    assert abs(ols[0] - 0.5) > 0.05
    assert fit_linear(np.full(4, 0.2), np.array([0.0, 0.1, 0.2, 0.9])) == {"a": 0.0, "b": pytest.approx(0.15)}


def test_histogram_mapping_reproduces_a_monotone_transform(tmp_path):
    rng = np.random.default_rng(0)
    source = np.sort(rng.uniform(-0.9, 0.9, 257))  # 257 pixels: the 257 quantiles are the pixels themselves
    target = source**3
    params = fit_trivial_baselines([_item(t1=source, flair=target)], ["t1"], "flair", tmp_path / "p.json")
    hist = params["mappings"]["t1"]["histogram"]
    np.testing.assert_allclose(hist["source_quantiles"], source, atol=1e-6)
    pred = TrivialPredictor(params, 0, "histogram")(torch.as_tensor(source, dtype=torch.float32).reshape(1, 1, 1, -1))
    np.testing.assert_allclose(pred.numpy().ravel(), target, atol=1e-6)
    # many pixels: between quantiles the piecewise-linear map stays close to the transform, and it is monotone
    many = rng.uniform(-0.9, 0.9, 20000)
    params = fit_trivial_baselines([_item(t1=many, flair=many**3)], ["t1"], "flair", tmp_path / "q.json")
    grid = torch.linspace(-0.85, 0.85, 501).reshape(1, 1, 1, -1)
    out = TrivialPredictor(params, 0, "histogram")(grid).numpy().ravel()
    assert np.abs(out - grid.numpy().ravel() ** 3).max() < 0.01 and np.all(np.diff(out) >= 0)


def test_predictor_shape_background_and_clamp():
    params = {
        "target": "flair",
        "conditions": ["t2", "t1"],
        "foreground": "nonbackground",
        "mappings": {
            "t2": {
                "linear": {"a": 3.0, "b": 0.5},
                "histogram": {"source_quantiles": [-1, 0, 0, 1], "target_quantiles": [-0.5, 0, 0.2, 0.5]},
            },
            "t1": {
                "linear": {"a": -1.0, "b": 0.0},
                "histogram": {"source_quantiles": [-1, 1], "target_quantiles": [-1, 1]},
            },
        },
    }
    x = torch.full((2, 2, 4, 4), -1.0)
    x[:, 0, 1:3, 1:3] = torch.tensor([[0.0, 0.1], [-0.5, 0.9]])
    x[:, 1] = 0.25
    lin = TrivialPredictor(params, 0, "linear")
    y = lin(x)
    assert y.shape == (2, 1, 4, 4) and lin.name == "copy_t2_linear"
    inside = torch.tensor([[0.5, 0.8], [-1.0, 1.0]])  # 3 * [0, .1, -.5, .9] + .5, clamped to [-1, 1]
    torch.testing.assert_close(y[:, 0, 1:3, 1:3], inside.expand(2, 2, 2))
    assert (y[:, 0][x[:, 0] == -1.0] == -1.0).all()  # the source's background stays background
    hist = TrivialPredictor(params, 0, "histogram")(x)  # tied quantiles at 0 take their mean (0.1)
    assert float(hist[0, 0, 1, 1]) == pytest.approx(0.1)
    assert float(hist[0, 0, 2, 1]) == pytest.approx(-0.2)  # halfway between (-1, -0.5) and (0, 0.1)
    torch.testing.assert_close(TrivialPredictor(params, 1, "linear")(x), torch.full((2, 1, 4, 4), -0.25))
    every = TrivialPredictor({**params, "foreground": "all"}, 0, "linear")(x)
    assert float(every[0, 0, 0, 0]) == pytest.approx(-1.0)  # 3 * -1 + .5, clamped, but mapped
    every = TrivialPredictor({**params, "foreground": "all"}, 1, "linear")(torch.full((1, 2, 2, 2), -1.0))
    assert (every == 1.0).all()  # in "all" mode -1 is an intensity like any other
    with pytest.raises(ValueError, match="kind must be one of"):
        TrivialPredictor(params, 0, "cubic")
    with pytest.raises(ValueError, match="condition_index 2"):
        TrivialPredictor(params, 2, "linear")


def test_json_round_trip_and_stage(tmp_path):
    rng = np.random.default_rng(1)
    items = []
    for _ in range(3):
        t = rng.uniform(-1, 1, (1, 8, 8)).astype(np.float32)
        items.append({"flair": torch.as_tensor(t), "t2": torch.as_tensor(0.7 * t + 0.1), "t1": torch.as_tensor(-t)})
    path = tmp_path / "models" / "trivial_baselines.json"
    params = fit_trivial_baselines(items, ["t2", "t1"], "flair", path)
    assert json.loads(path.read_text()) == params
    assert params["target"] == "flair" and params["conditions"] == ["t2", "t1"]
    assert len(params["mappings"]["t1"]["histogram"]["source_quantiles"]) == 257
    preds = trivial_predictors(path, ["t2", "t1"])
    assert list(preds) == ["copy_t2_linear", "copy_t2_histogram", "copy_t1_linear", "copy_t1_histogram"]
    x = torch.cat([items[0]["t2"], items[0]["t1"]])[None]
    for name, pred in preds.items():
        assert name == pred.name
        direct = TrivialPredictor(params, pred.index, pred.kind)(x)
        torch.testing.assert_close(pred(x), direct)
    torch.testing.assert_close(preds["copy_t1_linear"](x), items[0]["flair"][None], atol=1e-5, rtol=0)
    assert trivial_predictors(tmp_path / "absent.json", ["t2", "t1"]) == {}
    assert trivial_predictors(None, ["t2", "t1"]) == {}
    with pytest.raises(ValueError, match=r"fitted for conditions \['t2', 't1'\], not \['t1', 't2'\]"):
        trivial_predictors(path, ["t1", "t2"])
    with pytest.raises(ValueError, match="map to 'flair', not 't1c'"):
        trivial_predictors(path, ["t2", "t1"], target="t1c")
    with pytest.raises(ValueError, match="no training items"):
        fit_trivial_baselines([], ["t2"], "flair", tmp_path / "x.json")
    with pytest.raises(ValueError, match="foreground must be one of"):
        fit_trivial_baselines(items, ["t2"], "flair", tmp_path / "x.json", foreground="brain")
    before = path.stat().st_mtime_ns
    assert fit_trivial_stage(items[:1], ["t2", "t1"], "flair", path) == path  # exists: skipped
    assert path.stat().st_mtime_ns == before
    fit_trivial_stage(items[:1], ["t2", "t1"], "flair", path, refit=True)
    assert json.loads(path.read_text())["n_items"] == 1


# ------------------------------------------------------------------------------------------------ tiny BraTS
def _subject(folder: Path, seed: int, with_target: bool = True, shape=(28, 26, 14)) -> Path:
    """A tiny synthetic subject (plain names, RAS, 1 mm): an ellipsoid brain, smooth contrasts of one field."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = sum((g / 0.8) ** 2 for g in grid) <= 1.0
    field = np.sin(3 * grid[0] + rng.uniform(0, 3)) * np.cos(2 * grid[1]) + 0.3 * grid[2] + 0.1 * rng.random(shape)
    images = {"t2": 100 + 40 * field, "t1": 300 - 60 * field, "t1c": 200 + 30 * field**2, "flair": 80 + 35 * field}
    for name, img in images.items():
        if name == "flair" and not with_target:
            continue
        data = np.where(brain, img, 0.0).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), str(folder / f"{name}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def baseline_root(tmp_path_factory) -> Path:
    """A bundle root whose models/ holds the training record, the trivial baselines and a 2-iteration UNet."""
    tmp = tmp_path_factory.mktemp("baselines")
    _subject(tmp / "data" / "S1", seed=0)
    root = tmp / "bundle"
    models = root / "models"
    task = BraTSTaskData(tmp / "data", gap_mm=1.0, reference_path=models / "target_intensity.json")
    items = task.items("training")
    fit_trivial_stage(items, CONDITIONS, "flair", models / "trivial_baselines.json")
    train_baseline_stage(
        items, CONDITIONS, "flair", models / "baseline_unet.pt", max_iterations=2, batch_size=4, channels=[8, 8, 8, 8]
    )
    return root


def _impute_args(root: Path, subject: Path, out: Path, method: str) -> list[str]:
    overrides = [f"{k}={json.dumps(v)}" for k, v in SETTINGS.items()]
    return [
        str(subject),
        "--bundle-root",
        str(root),
        "--config-file",
        *CONFIG_FILES,
        "--output-dir",
        str(out),
        "--method",
        method,
        "--set",
        *overrides,
    ]


def _check_output(path: Path, subject: Path, side: dict) -> None:
    src = nib.load(str(subject / "t2.nii.gz"))
    img = nib.load(str(path))
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine)
    data = np.asarray(img.dataobj)
    brain = np.zeros(src.shape, dtype=bool)
    for m in CONDITIONS:
        brain |= np.asarray(nib.load(str(subject / f"{m}.nii.gz")).dataobj) > 0
    lo, hi = side["intensity_mapping"]["clamped_to"]
    assert [lo, hi] == [side["intensity_mapping"]["lower"], side["intensity_mapping"]["upper"]]
    assert data[~brain].max() == 0 and data[brain].min() >= np.float32(lo) and data[brain].max() <= np.float32(hi)


def test_impute_baselines_write_what_damm_writes(baseline_root, tmp_path, monkeypatch):
    import damm.model

    subject = _subject(tmp_path / "S2", seed=5, with_target=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the DAMM model must not be loaded for a baseline")

    monkeypatch.setattr(damm.model, "load_model", refuse)
    sides = {}
    for method, made_by in [
        ("copy_t2_histogram", "trivial_baselines.json"),
        ("copy_t1_linear", "trivial_baselines"),
        ("unet", "baseline_unet.pt"),
    ]:
        out = tmp_path / method
        assert main(_impute_args(baseline_root, subject, out, method)) == 0
        path = out / "flair.nii.gz"
        side = json.loads((out / "flair.json").read_text())
        assert side["method"] == method and side["synthetic"] and side["subject"] == "S2"
        assert made_by in side["model"]["checkpoint"] and len(side["model"]["sha256"]) == 64
        assert side["sampler"] is None and side["steps"] is None and side["seed"] is None
        assert side["branch_statistics"] is None
        assert side["intensity_mapping"]["source"].endswith("target_intensity.json")
        _check_output(path, subject, side)
        sides[method] = side
    # the trivial copy of T2 follows T2 (flair and t2 are the same field up to a positive scale)
    t2 = np.asarray(nib.load(str(subject / "t2.nii.gz")).dataobj)
    pred = np.asarray(nib.load(str(tmp_path / "copy_t2_histogram" / "flair.nii.gz")).dataobj)
    assert np.corrcoef(t2[t2 > 0], pred[t2 > 0])[0, 1] > 0.95
    monkeypatch.undo()
    # DAMM (an untrained model of the tiny architecture: the format, not the quality, is under test)
    from monai.bundle import ConfigParser

    from damm.model import export_model

    parser = ConfigParser()
    parser.read_config(CONFIG_FILES)
    parser.update({"bundle_root": str(baseline_root), **SETTINGS})
    export_model(parser.get_parsed_content("network_def"), baseline_root / "models" / "model.pt")
    out = tmp_path / "damm"
    assert main([*_impute_args(baseline_root, subject, out, "damm"), "--steps", "2", "--seed", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["flair.json", "flair.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["flair.json", "flair.nii.gz"]
    side = json.loads((out / "flair.json").read_text())
    assert side["method"] == "damm" and side["steps"] == 2 and side["seed"] == 3 and side["sampler"]
    assert side["model"]["checkpoint"].endswith("model.pt")
    for other in sides.values():
        assert set(other) == set(side)
        assert set(other["intensity_mapping"]) == set(side["intensity_mapping"])
    _check_output(out / "flair.nii.gz", subject, side)


def test_impute_missing_model_files_name_the_command(tmp_path, capsys):
    subject = _subject(tmp_path / "S3", seed=2, with_target=False)
    empty = tmp_path / "empty_bundle"
    args = [str(subject), "--bundle-root", str(empty), "--config-file", *CONFIG_FILES]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--method", "unet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "UNet baseline" in err and "models/baseline_unet.pt' not found" in err and "run train_baseline" in err
    with pytest.raises(
        FileNotFoundError,
        match=r"trivial baselines '.*models/trivial_baselines\.json' not found.*"
        r"run fit_trivial",
    ):
        impute(subject, empty, CONFIG_FILES, method="copy_t1c_histogram")
    with pytest.raises(FileNotFoundError, match=r"model checkpoint '.*models/model\.pt' not found.*run training"):
        impute(subject, empty, CONFIG_FILES)
    with pytest.raises(ValueError, match=r"unknown --method 'copy_flair_linear'; expected one of \['damm', 'unet'"):
        impute(subject, empty, CONFIG_FILES, method="copy_flair_linear")
    with pytest.raises(ValueError, match=r"sampling settings \['steps'\] apply to --method damm only"):
        impute(subject, empty, CONFIG_FILES, method="unet", steps=3)


# ------------------------------------------------------------------------------------------------ clamping
def _wild(x: torch.Tensor) -> torch.Tensor:
    """A predictor far outside [-1, 1]: +5 where the anchor is above its median, -5 elsewhere."""
    a = x[:, :1]
    return torch.where(a > a.median(), torch.full_like(a, 5.0), torch.full_like(a, -5.0))


def test_outputs_are_clamped_to_the_stated_range_brats(tmp_path):
    subject = _subject(tmp_path / "S4", seed=3, with_target=False)
    task = BraTSTaskData(tmp_path, multiple=16)
    files = {m: subject / f"{m}.nii.gz" for m in CONDITIONS}
    out = synthesise_to_file(
        task,
        None,
        None,
        files,
        tmp_path / "o" / "flair.nii.gz",
        name="S4",
        intensity_reference={"lower": 40.0, "upper": 120.0},
        predictor=_wild,
        method="wild",
    )
    side = json.loads((tmp_path / "o" / "flair.json").read_text())
    assert side["method"] == "wild" and side["intensity_mapping"]["clamped_to"] == [40.0, 120.0]
    _check_output(out, subject, side)
    data = np.asarray(nib.load(str(out)).dataobj)
    assert (data == 120.0).sum() > 0 and (data == 40.0).sum() > 0  # both ends reached, none passed
    with pytest.raises(ValueError, match="needs a model and an inferer, or a predictor"):
        synthesise_to_file(task, None, None, files, tmp_path / "p.nii.gz", intensity_reference={"lower": 0, "upper": 1})


def test_outputs_are_clamped_to_the_stated_range_microscopy(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", rng.integers(0, 200, size=(40, 72)).astype(np.uint8))
    task = MicroscopyTaskData(tmp_path, target="c", conditions=["a", "b"], tile_size=32)
    files = {k: tmp_path / f"{k}.tif" for k in ("a", "b")}
    out = synthesise_field_to_file(
        None,
        None,
        files,
        tmp_path / "o" / "f_c.tif",
        task,
        intensity_reference={"lower": 5.5, "upper": 200.4},
        predictor=_wild,
        method="wild",
    )
    pred = tifffile.imread(out)
    side = json.loads((tmp_path / "o" / "f_c.json").read_text())
    assert pred.shape == (40, 72) and pred.dtype == np.uint8
    assert side["intensity_mapping"]["clamped_to"] == [5.5, 200.4] and side["method"] == "wild"
    assert pred.min() == 6 and pred.max() == 200  # the integers within [5.5, 200.4]

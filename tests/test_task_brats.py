"""BraTS task: slice split, tiny bundle training, whole-subject inference on the input grid, masked metrics,
the missing-modality command on a copy of the subject, and bad input (tiny: 4 mm, 3 sampling steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from damm.tasks.brats import BraTSTaskData, prepare_subject, write_nifti_like
from damm.tasks.brats_files import check_subject_files, subject_files
from damm.tasks.brats_volume import heldout_slab
from damm.tasks.impute import bundle_config_files, impute, main
from damm.tasks.metrics import masked_metrics, to_unit

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
CONFIG_FILES = [str(CONFIGS / "common.json"), str(CONFIGS / "train.json"), str(CONFIGS / "task_brats.json")]

# tiny networks (autoencoder 4x, denoiser 4x -> slices padded to multiples of 16), 4 mm voxels
NET = {"ae_channels": [8, 8, 8], "dm_channels": [8, 8, 8, 8], "dm_time_embed_dim": 16, "task_pixdim": [4, 4, 4]}
TINY = {
    **NET,
    "ae_norm_num_groups": 8,
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
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def brats_dir(shared_data) -> Path:
    path = shared_data / "brats"
    if not (path / "TCGA-DU-7294" / "flair.nii.gz").is_file():
        pytest.skip("shared BraTS subject not found")
    return path


def _run(root: Path, data: Path, run_id: str, **extra) -> None:
    wf = ConfigWorkflow(
        config_file=CONFIG_FILES,
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
def trained(tmp_path_factory, brats_dir) -> Path:
    """Baseline + both DAMM stages + whole-subject evaluation through the bundle (task overlay)."""
    root = tmp_path_factory.mktemp("brats_bundle")
    _run(root, brats_dir, "train_baseline")
    _run(root, brats_dir, "training", task_eval_branches=["damm", "uni"])
    return root


# ------------------------------------------------------------------------------------------------ pure functions
def test_masked_metrics_hand_computed():
    t = torch.zeros(8, 8)
    p = torch.zeros(8, 8)
    p[2, 3] = 0.5  # one wrong voxel inside the mask
    p[0, 0] = 1.0  # a wrong voxel outside the mask must not count
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1:7, 1:7] = True
    m = masked_metrics(p, t, mask, win_size=3, axis=None)
    assert m["n_voxels"] == 36
    assert m["mae"] == pytest.approx(0.5 / 36)
    assert m["psnr"] == pytest.approx(10 * np.log10(1 / (0.25 / 36)))
    same = masked_metrics(t + 0.3, t + 0.3, mask, win_size=3, axis=None)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6) and same["psnr"] == float("inf")
    vol = masked_metrics(torch.rand(6, 6, 4), torch.rand(6, 6, 4), torch.ones(6, 6, 4), win_size=3)
    assert vol["n_voxels"] == 144 and -1 <= vol["ssim"] <= 1
    assert np.isnan(masked_metrics(p, t, torch.zeros(8, 8), axis=None)["psnr"])
    with pytest.raises(ValueError, match="same shape"):
        masked_metrics(p, t[:4], mask)
    assert float(to_unit(torch.tensor([-5.0, 5.0, 15.0]), 0.0, 10.0).sum()) == pytest.approx(1.5)


def test_heldout_slab_fractions():
    s = np.arange(10, dtype=float)  # slice centres 0..9 mm, spacing 1 -> brain edges -0.5..9.5
    lo, hi, gap = heldout_slab(s, 1.0, (0.5, 0.7), 1.0)
    assert (lo, hi, gap) == pytest.approx((4.5, 6.5, 1.0))
    with pytest.raises(ValueError, match="fractions"):
        heldout_slab(s, 1.0, (0.7, 0.5), 1.0)


# ------------------------------------------------------------------------------------------------ bad input (no data)
def _nifti(path: Path, shape=(8, 8, 6), spacing=1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(shape, dtype=np.float32)
    data[2:6, 2:6, 1:5] = np.arange(1, 65, dtype=np.float32).reshape(4, 4, 4)
    nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


def test_bad_subjects_fail_before_work(tmp_path):
    subj = tmp_path / "s1"
    for m in ("t1", "t1c", "t2"):
        _nifti(subj / f"{m}.nii.gz")
    _nifti(subj / "flair.nii.gz", shape=(8, 8, 5))
    info = subject_files(subj)
    assert info["scheme"] == "plain" and sorted(info["files"]) == ["flair", "t1", "t1c", "t2"]
    with pytest.raises(ValueError, match=r"not co-registered.*flair\.nii\.gz shape=\(8, 8, 5\)"):
        check_subject_files(info["files"])
    with pytest.raises(ValueError, match=r"missing source modalities \['t1c'\]"):
        prepare_subject({"t2": subj / "t2.nii.gz", "t1": subj / "t1.nii.gz"}, ["t2", "t1", "t1c"])
    # the missing-modality command checks the subject before it needs a model
    (subj / "flair.nii.gz").unlink()
    _nifti(subj / "t1c.nii.gz", spacing=2.0)
    with pytest.raises(ValueError, match="not co-registered"):
        impute(subj, bundle_root=tmp_path / "no_bundle", config_files=CONFIG_FILES)
    (subj / "t1c.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"missing source modalities \['t1c'\]"):
        impute(subj, bundle_root=tmp_path / "no_bundle", config_files=CONFIG_FILES)
    # BraTS 2023 naming: an existing real FLAIR (t2f) is never overwritten
    b23 = tmp_path / "BraTS-GLI-00001-000"
    for tag in ("t1n", "t1c", "t2w", "t2f"):
        _nifti(b23 / f"BraTS-GLI-00001-000-{tag}.nii.gz")
    with pytest.raises(FileExistsError, match=r"t2f\.nii\.gz exists \(a real flair acquisition\)"):
        impute(b23, bundle_root=tmp_path / "no_bundle", config_files=CONFIG_FILES)
    with pytest.raises(SystemExit) as exit_info:
        main([str(b23), "--bundle-root", str(tmp_path / "no_bundle"), "--config-file", *CONFIG_FILES])
    assert exit_info.value.code == 2


def test_impute_finds_configs_through_the_bundle_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./bundle here
    monkeypatch.delenv("DAMM_BUNDLE_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match=r"not found in .*no_bundle/configs.*--bundle-root.*DAMM_BUNDLE_ROOT"):
        bundle_config_files(tmp_path / "no_bundle")
    monkeypatch.setenv("DAMM_BUNDLE_ROOT", str(REPO / "bundle"))
    assert list(bundle_config_files()) == CONFIG_FILES  # the environment's bundle root
    assert list(bundle_config_files(tmp_path / "run")) == CONFIG_FILES  # a run folder without configs/
    own = tmp_path / "own" / "configs"
    own.mkdir(parents=True)
    for f in CONFIG_FILES:
        shutil.copy(f, own / Path(f).name)
    assert bundle_config_files(tmp_path / "own") == tuple(str(own / Path(f).name) for f in CONFIG_FILES)
    subj = tmp_path / "s"
    for m in ("t1", "t1c", "t2"):
        _nifti(subj / f"{m}.nii.gz")
    monkeypatch.delenv("DAMM_BUNDLE_ROOT")
    with pytest.raises(SystemExit) as exit_info:  # the command names the option
        main([str(subj), "--bundle-root", str(tmp_path / "no_bundle")])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------------------------------ real subject
def test_slice_split_is_disjoint(brats_dir):
    task = BraTSTaskData(brats_dir, pixdim=[4, 4, 4], heldout_range=(0.6, 0.8), gap_mm=6.0)
    assert task.resolved_split_mode() == "slices"
    train = {it["slice_index"] for it in task.items("training")}
    test = {it["slice_index"] for it in task.items("test")}
    assert train and test and not train & test
    # 6 mm gap at 4 mm spacing: at least one unused slice on each side of the held-out slab
    assert min(test) - max(z for z in train if z < min(test)) >= 2
    assert min(z for z in train if z > max(test)) - max(test) >= 2
    shapes = {tuple(it["flair"].shape) for it in task.items("training")}
    assert len(shapes) == 1 and all(s % 16 == 0 for s in next(iter(shapes))[1:])
    x = task.items("training")[0]["t2"]
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_training_evaluates_whole_subject_on_input_grid(trained, brats_dir):
    models = trained / "models"
    for name in ("model.pt", "model_autoencoder.pt", "baseline_unet.pt", "target_intensity.json"):
        assert (models / name).is_file(), name
    ref = json.loads((models / "target_intensity.json").read_text())
    assert ref["modality"] == "flair" and ref["upper"] > ref["lower"]
    res = json.loads((trained / "eval" / "task" / "task_evaluation.json").read_text())
    assert res["split_mode"] == "slices"
    methods = res["subjects"]["TCGA-DU-7294"]["methods"]
    trivial = {f"copy_{c}_{k}" for c in ("t2", "t1", "t1c") for k in ("linear", "histogram")}
    assert set(methods) == {"autoencoder_ceiling", "damm", "uni", "unet_baseline", *trivial}
    assert (models / "trivial_baselines.json").is_file()  # fitted on the training slices before the evaluation
    for rec in methods.values():
        for region in ("brain", "tumour"):  # the held-out slab holds part of the tumour
            assert np.isfinite(rec[region]["psnr"]) and 0 < rec[region]["mae"] < 1 and rec[region]["n_voxels"] > 0
        assert rec["tumour"]["n_voxels"] < rec["brain"]["n_voxels"]
    src = nib.load(str(brats_dir / "TCGA-DU-7294" / "t2.nii.gz"))
    out = nib.load(str(trained / "eval" / "task" / "TCGA-DU-7294" / "damm_flair.nii.gz"))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine)
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    data = np.asarray(out.dataobj)
    brain = np.zeros(src.shape, dtype=bool)
    for m in ("t2", "t1", "t1c"):  # brain = union of the source modalities
        brain |= np.asarray(nib.load(str(brats_dir / "TCGA-DU-7294" / f"{m}.nii.gz")).dataobj) > 0
    assert data[~brain].max() == 0 and data[brain].max() > 0  # background stays empty, brain is filled
    assert "| damm | brain |" in (trained / "eval" / "task" / "task_evaluation.md").read_text()


def test_impute_missing_flair_on_a_copy(trained, brats_dir, tmp_path):
    subj = tmp_path / "TCGA-DU-7294"
    subj.mkdir()
    for m in ("t1", "t1c", "t2"):
        shutil.copy(brats_dir / "TCGA-DU-7294" / f"{m}.nii.gz", subj / f"{m}.nii.gz")
    overrides = [f"{k}={json.dumps(v)}" for k, v in NET.items()]
    args = [str(subj), "--bundle-root", str(trained), "--config-file", *CONFIG_FILES]
    assert main([*args, "--steps", "3", "--seed", "1", "--set", *overrides]) == 0
    out = subj / "flair.nii.gz"
    src = nib.load(str(subj / "t2.nii.gz"))
    img = nib.load(str(out))
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine)
    side = json.loads((subj / "flair.json").read_text())
    assert side["synthetic"] and side["steps"] == 3 and side["seed"] == 1
    assert side["model"]["checkpoint"].endswith("model.pt") and len(side["model"]["sha256"]) == 64
    assert side["intensity_mapping"]["source"].endswith("target_intensity.json")
    before = out.stat().st_mtime_ns
    with pytest.raises(SystemExit):  # the output now exists (an earlier synthesis): refused
        main([*args, "--steps", "3", "--set", *overrides])
    assert out.stat().st_mtime_ns == before


def test_write_nifti_like_keeps_geometry(tmp_path):
    ref = _nifti(tmp_path / "ref.nii.gz", spacing=1.5)
    arr = np.random.default_rng(0).random((8, 8, 6)).astype(np.float32)
    out = write_nifti_like(arr, ref, tmp_path / "o" / "x.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, nib.load(str(ref)).affine)
    np.testing.assert_allclose(np.asarray(img.dataobj), arr)
    with pytest.raises(ValueError, match="shape"):
        write_nifti_like(arr[:4], ref, tmp_path / "y.nii.gz")


def test_write_nifti_like_keeps_qform_sform_and_codes(tmp_path):
    """A scanner-anchored qform and an aligned sform that differ stay as they are, codes included."""
    qform = np.array([[0.0, -1.2, 0.0, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])
    sform = qform.copy()
    sform[:3, 3] += [1.0, 2.0, 3.0]
    img = nib.Nifti1Image(np.zeros((8, 8, 6), np.int16), None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    ref = tmp_path / "ref.nii.gz"
    nib.save(img, str(ref))
    out = nib.load(str(write_nifti_like(np.ones((8, 8, 6), np.float32), ref, tmp_path / "x.nii.gz")))
    src = nib.load(str(ref))
    for get in ("get_qform", "get_sform"):
        (a, ca), (b, cb) = getattr(out.header, get)(coded=True), getattr(src.header, get)(coded=True)
        np.testing.assert_allclose(a, b)
        assert int(ca) == int(cb)
    np.testing.assert_allclose(out.affine, src.affine)
    assert out.shape == src.shape and nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
    assert out.get_data_dtype() == np.float32


def test_impute_takes_the_preprocessing_from_the_training_record(trained, brats_dir, tmp_path):
    """Without --set task_pixdim the trained model's record supplies it: same output as the explicit override."""
    record = json.loads((trained / "models" / "task_preprocessing.json").read_text())
    assert record["settings"]["task_pixdim"] == [4.0, 4.0, 4.0] and record["settings"]["target"] == "flair"
    subj = tmp_path / "TCGA-DU-7294"
    subj.mkdir()
    for m in ("t1", "t1c", "t2"):
        shutil.copy(brats_dir / "TCGA-DU-7294" / f"{m}.nii.gz", subj / f"{m}.nii.gz")
    net_only = [f"{k}={json.dumps(v)}" for k, v in NET.items() if k != "task_pixdim"]
    explicit = [f"{k}={json.dumps(v)}" for k, v in NET.items()]
    args = [str(subj), "--bundle-root", str(trained), "--config-file", *CONFIG_FILES, "--steps", "2", "--seed", "1"]
    assert main([*args, "--output-dir", str(tmp_path / "a"), "--set", *net_only]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "b"), "--set", *explicit]) == 0
    a = nib.load(str(tmp_path / "a" / "flair.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "b" / "flair.nii.gz")).get_fdata()
    np.testing.assert_array_equal(a, b)


def test_impute_baselines_on_a_copy(trained, brats_dir, tmp_path):
    """--method unet / copy_<condition>_<kind> write the file DAMM writes, with the same sidecar keys, clamped."""
    subj = tmp_path / "TCGA-DU-7294"
    subj.mkdir()
    for m in ("t1", "t1c", "t2"):
        shutil.copy(brats_dir / "TCGA-DU-7294" / f"{m}.nii.gz", subj / f"{m}.nii.gz")
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**NET, "baseline_channels": TINY["baseline_channels"]}.items()]
    args = [str(subj), "--bundle-root", str(trained), "--config-file", *CONFIG_FILES, "--set", *overrides]
    sides = {}
    for method in ("damm", "unet", "copy_t1_histogram"):
        out = tmp_path / method
        extra = ["--steps", "2"] if method == "damm" else []
        assert main([*args, "--method", method, "--output-dir", str(out), *extra]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["flair.json", "flair.nii.gz"]
        sides[method] = json.loads((out / "flair.json").read_text())
        assert sides[method]["method"] == method
        img = nib.load(str(out / "flair.nii.gz"))
        np.testing.assert_allclose(img.affine, nib.load(str(subj / "t2.nii.gz")).affine)
        lo, hi = sides[method]["intensity_mapping"]["clamped_to"]
        data = np.asarray(img.dataobj)
        assert data.min() >= 0 and data.max() <= np.float32(hi) and data[data > 0].min() >= np.float32(lo)
    assert set(sides["unet"]) == set(sides["damm"]) == set(sides["copy_t1_histogram"])
    assert sides["unet"]["model"]["checkpoint"].endswith("baseline_unet.pt") and sides["unet"]["sampler"] is None
    assert sides["copy_t1_histogram"]["model"]["checkpoint"].endswith("trivial_baselines.json")

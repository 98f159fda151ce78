"""DRDM files and bundle: datalists, NIfTI geometry round trips, statistics, run ids end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from data_prep.volumes import build_volume_datalist
from data_prep.volumes import main as volumes_main
from ddcore.checkpoints import latest_checkpoint
from ddcore.datalist import load_volume_datalist
from drdm.io import deformation_stats, file_dtype, read_volume, save_ddf, save_volume, spacing

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
TINY = {"network_def#channels": [2, 4, 8], "diffusion#control_size": 16}
AFFINE = np.array([[0.0, 0.0, 2.5, 10.0], [-1.5, 0.0, 0.0, 4.0], [0.0, 1.0, 0.0, -3.0], [0.0, 0.0, 0.0, 1.0]])


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_case(folder: Path, name: str, shape=(20, 16, 12), seed=0, label_shape=None, float_label=False):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 3, s) for s in shape], indexing="ij")
    img = (100 * sum(np.sin(2 * g + i) for i, g in enumerate(grids)) + rng.normal(0, 1, shape)).astype(np.int16)
    lab_shape = label_shape or shape
    idx = np.meshgrid(*[np.arange(s) for s in lab_shape], indexing="ij")
    lab = ((idx[0] // 5) * 2 + (idx[1] // 6) % 2 + 3).astype(np.float32 if float_label else np.uint8)
    if float_label:
        lab[0, 0, 0] = 0.5
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "lab").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, AFFINE), folder / "img" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(lab, AFFINE), folder / "lab" / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drdm_data")
    _write_case(root, "case_a", seed=0)
    _write_case(root, "case_b", seed=1)
    build_volume_datalist(root / "img", root / "datalist.json", root / "lab")
    return root


def _workflow(name: str, run_id: str, bundle_root: Path, dataset_dir: Path, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "drdm_common.json"), str(CONFIGS / name)],
        meta_file=None,
        logging_file=False,
        workflow_type="train" if run_id == "training" else "infer",
        run_id=run_id,
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        **{**TINY, **overrides},
    )
    wf.initialize()
    return wf


def test_datalist_builder_and_errors(dataset, tmp_path):
    items = load_volume_datalist(dataset / "datalist.json")
    assert [i["id"] for i in items] == ["case_a", "case_b"]
    assert all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)
    raw = json.loads((dataset / "datalist.json").read_text())
    assert raw["training"][0]["image"] == "img/case_a.nii.gz"  # relative to the datalist folder
    out = volumes_main(["--images", str(dataset / "img"), "--out", str(tmp_path / "images_only.json")])
    assert "label" not in load_volume_datalist(out)[0]
    _write_case(tmp_path / "bad", "c", label_shape=(20, 16, 11))
    with pytest.raises(ValueError, match="shape"):
        build_volume_datalist(tmp_path / "bad" / "img", tmp_path / "bad.json", tmp_path / "bad" / "lab")
    with pytest.raises(FileNotFoundError, match="no label"):
        build_volume_datalist(dataset / "img", tmp_path / "x.json", tmp_path / "bad" / "lab")
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        load_volume_datalist(tmp_path / "missing.json")


def test_affine_round_trip_and_ddf_file(tmp_path, dataset):
    vol = read_volume(dataset / "img" / "case_a.nii.gz", 3)
    source = nib.load(dataset / "img" / "case_a.nii.gz")
    assert vol.shape == (1, 20, 16, 12) and np.array_equal(vol[0].numpy(), np.asarray(source.dataobj))
    assert file_dtype(vol) == np.int16 and np.allclose(vol.affine.numpy(), AFFINE)
    save_volume(vol[0].numpy() * 2, vol, tmp_path / "out.nii.gz", np.float32)
    back = nib.load(tmp_path / "out.nii.gz")
    assert np.allclose(back.affine, AFFINE) and nib.aff2axcodes(back.affine) == nib.aff2axcodes(AFFINE)
    assert np.allclose(np.asarray(back.dataobj), vol[0].numpy() * 2)
    assert spacing(vol) == pytest.approx((1.5, 1.0, 2.5))
    ddf = torch.randn(3, *vol.shape[1:])
    save_ddf(ddf, vol, tmp_path / "ddf.nii.gz")
    img = nib.load(tmp_path / "ddf.nii.gz")
    assert img.shape == (*vol.shape[1:], 1, 3) and img.header.get_intent()[0] == "vector"
    assert img.header.get_intent()[2] == "ddf_voxels"
    assert np.allclose(np.asarray(img.dataobj)[..., 0, :], np.moveaxis(ddf.numpy(), 0, -1))
    assert np.allclose(img.affine, AFFINE)
    with pytest.raises(ValueError, match="not on the reference grid"):
        save_volume(np.zeros((20, 16, 11)), vol, tmp_path / "bad.nii.gz")


def test_read_volume_2d_slice_and_errors(tmp_path):
    slice_ = (np.arange(30 * 22) % 200).astype(np.uint8).reshape(30, 22, 1)
    nib.save(nib.Nifti1Image(slice_, AFFINE), tmp_path / "s.nii.gz")
    vol = read_volume(tmp_path / "s.nii.gz", 2, "slice")
    assert vol.shape == (1, 30, 22) and spacing(vol) == pytest.approx((1.5, 1.0)) and file_dtype(vol) == np.uint8
    save_volume(vol[0] + 1, vol, tmp_path / "out.nii.gz", np.uint8)
    out = nib.load(tmp_path / "out.nii.gz")  # stored on the input's grid (X, Y, 1)
    assert out.shape == (30, 22, 1) and np.array_equal(np.asarray(out.dataobj)[..., 0], vol[0].numpy() + 1)
    save_ddf(torch.ones(2, 30, 22), vol, tmp_path / "ddf.nii.gz")
    assert nib.load(tmp_path / "ddf.nii.gz").shape == (30, 22, 1, 1, 2)
    nib.save(nib.Nifti1Image(np.zeros((30, 22, 2), np.float32), AFFINE), tmp_path / "thick.nii.gz")
    with pytest.raises(ValueError, match=r"slice: .* has shape \(30, 22, 2\); expected 2 spatial dims"):
        read_volume(tmp_path / "thick.nii.gz", 2, "slice")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), AFFINE), tmp_path / "two.nii.gz")
    with pytest.raises(ValueError, match="one channel"):
        read_volume(tmp_path / "two.nii.gz", 3, "image")
    with pytest.raises(FileNotFoundError, match="label: file not found"):
        read_volume(tmp_path / "missing.nii.gz", 3, "label")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="image: cannot read"):
        read_volume(tmp_path / "bad.nii.gz", 3)


def test_deformation_stats_hand_computed():
    ddf = torch.zeros(3, 10, 8, 4)
    ddf[0] = 2.0  # 2 voxels along axis 0 at 1.5 mm = 3 mm everywhere
    stats = deformation_stats(ddf, (1.5, 1.0, 2.5))
    assert stats["mean_displacement_mm"] == pytest.approx(3.0)
    assert stats["p99_displacement_mm"] == pytest.approx(3.0)
    assert stats["image_size_mm"] == pytest.approx(15.0)  # longest physical edge: 10 x 1.5
    assert stats["mean_displacement_pct"] == pytest.approx(20.0)
    assert stats["folding_fraction"] == 0.0


def test_latest_checkpoint_is_numeric(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for n in (2, 9, 10):
        (tmp_path / f"checkpoint_epoch={n}.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=10.pt"


def test_bundle_run_ids_end_to_end(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs must not depend on the working directory
    bundle = tmp_path / "bundle"
    train = _workflow("drdm_train.json", "training", bundle, dataset, roi_size=[16, 16, 8], max_epochs=2)
    assert train.check_properties() == []
    train.run()
    ckpt_dir = bundle / "models" / "drdm"
    assert {"checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "model.pt"} <= {p.name for p in ckpt_dir.iterdir()}
    state = torch.load(ckpt_dir / "checkpoint_epoch=2.pt", weights_only=True)
    assert set(state) == {"model", "optimizer", "trainer"} and state["trainer"]["iteration"] == 2
    # resume: picks checkpoint_epoch=2 and continues to epoch 3 only
    resumed = _workflow("drdm_train.json", "training", bundle, dataset, roi_size=[16, 16, 8], max_epochs=3)
    resumed.run()
    trainer = resumed.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 3 and trainer.state.iteration == 3
    assert any((bundle / "eval" / "drdm_train").glob("events.out.tfevents*"))

    aug = _workflow("drdm_augment.json", "augment", bundle, dataset, t_primes=[2, 3], outputs_per_level=1)
    aug.run()
    out_dir = bundle / "eval" / "drdm_augment"
    report = json.loads((out_dir / "case_a_tp003_00.json").read_text())
    for key in ("t_prime", "mean_displacement_mm", "p99_displacement_mm", "mean_displacement_pct", "folding_fraction"):
        assert key in report
    assert report["t_prime"] == 3 and report["mean_displacement_mm"] > 0
    src_lab = nib.load(dataset / "lab" / "case_a.nii.gz")
    for suffix in ("image", "label", "ddf"):
        img = nib.load(out_dir / f"case_a_tp003_00_{suffix}.nii.gz")
        assert np.allclose(img.affine, AFFINE) and img.shape[:3] == (20, 16, 12)
    lab = nib.load(out_dir / "case_a_tp003_00_label.nii.gz")
    assert lab.get_data_dtype() == src_lab.get_data_dtype()
    assert set(np.unique(np.asarray(lab.dataobj))) <= set(np.unique(np.asarray(src_lab.dataobj)))
    assert len(load_volume_datalist(out_dir / "augmented_datalist.json")) == 4

    pairs = _workflow("drdm_register_pairs.json", "register_pairs", bundle, dataset, level_pairs=[[2, 3]])
    pairs.run()
    pair_dir = bundle / "eval" / "drdm_register_pairs"
    rep = json.loads((pair_dir / "case_b_pair00_00.json").read_text())
    assert rep["t_aug"] == 2 and rep["t_syn"] == 3
    for suffix in ("moving", "fixed", "ddf", "moving_label", "fixed_label"):
        assert np.allclose(nib.load(pair_dir / f"case_b_pair00_00_{suffix}.nii.gz").affine, AFFINE)


def test_bundle_rejects_bad_input_before_work(tmp_path):
    _write_case(tmp_path / "d", "c", label_shape=(20, 16, 11))
    datalist = [{"image": str(tmp_path / "d" / "img" / "c.nii.gz"), "label": str(tmp_path / "d" / "lab" / "c.nii.gz")}]
    (tmp_path / "d" / "datalist.json").write_text(json.dumps({"training": datalist}))
    wf = _workflow("drdm_augment.json", "augment", tmp_path / "b", tmp_path / "d", checkpoint=None, t_primes=[2])
    with pytest.raises(RuntimeError) as err:
        wf.run()
    assert "must share the grid" in str(err.value.__cause__)
    assert not (tmp_path / "b" / "eval" / "drdm_augment").exists()
    _write_case(tmp_path / "f", "c", float_label=True)
    build_volume_datalist(tmp_path / "f" / "img", tmp_path / "f" / "datalist.json", tmp_path / "f" / "lab")
    wf = _workflow("drdm_augment.json", "augment", tmp_path / "b", tmp_path / "f", checkpoint=None, t_primes=[2])
    with pytest.raises(RuntimeError) as err:
        wf.run()
    assert "not an integer label map" in str(err.value.__cause__)
    wf = _workflow("drdm_augment.json", "augment", tmp_path / "b", tmp_path / "f", checkpoint=None, t_primes=[90])
    with pytest.raises(RuntimeError) as err:
        wf.run()
    assert "[1, 80]" in str(err.value.__cause__)


@pytest.mark.shared_data
def test_shared_ct_augmentation(shared_data, tmp_path):
    """The 41-label 122x101x30 CT: outputs on the input grid and affine, labels a subset of the input's."""
    ct = shared_data / "ct"
    build_volume_datalist([ct / "ct.nii.gz"], tmp_path / "datalist.json", [ct / "seg.nii.gz"])
    wf = _workflow(
        "drdm_augment.json",
        "augment",
        tmp_path / "b",
        tmp_path,
        checkpoint=None,
        t_primes=[10],
        outputs_per_level=1,
        **{"network_def#recursions": 1},
    )
    wf.run()
    out = tmp_path / "b" / "eval" / "drdm_augment"
    src, seg = nib.load(ct / "ct.nii.gz"), nib.load(ct / "seg.nii.gz")
    lab = nib.load(out / "ct_tp010_00_label.nii.gz")
    img = nib.load(out / "ct_tp010_00_image.nii.gz")
    assert img.shape == src.shape == (122, 101, 30) and np.allclose(img.affine, src.affine)
    values = set(np.unique(np.asarray(lab.dataobj)))
    assert values <= set(np.unique(np.asarray(seg.dataobj))) and len(values) > 30
    rep = json.loads((out / "ct_tp010_00.json").read_text())
    assert rep["spacing_mm"] == pytest.approx([3.0, 3.0, 3.0]) and 0.2 < rep["mean_displacement_pct"] < 10
    assert not np.array_equal(np.asarray(lab.dataobj), np.asarray(seg.dataobj))


def test_bundle_2d_slices(tmp_path):
    """2D NIfTI slices (stored as X x Y x 1): training and augmentation with spatial_dims 2."""
    data = tmp_path / "d2"
    for name, seed in (("s0", 0), ("s1", 1)):
        _write_case(data, name, shape=(30, 22, 1), seed=seed)
    build_volume_datalist(data / "img", data / "datalist.json", data / "lab")
    bundle = tmp_path / "b2"
    common = {"spatial_dims": 2}
    _workflow("drdm_train.json", "training", bundle, data, roi_size=[16, 16], max_epochs=1, **common).run()
    aug = _workflow("drdm_augment.json", "augment", bundle, data, t_primes=[3], outputs_per_level=1, **common)
    aug.run()
    out = bundle / "eval" / "drdm_augment"
    img, ddf = nib.load(out / "s1_tp003_00_image.nii.gz"), nib.load(out / "s1_tp003_00_ddf.nii.gz")
    assert img.shape == (30, 22, 1) and ddf.shape == (30, 22, 1, 1, 2) and np.allclose(img.affine, AFFINE)
    assert json.loads((out / "s1_tp003_00.json").read_text())["t_prime"] == 3


@pytest.mark.parametrize("fixed_from", ["source", "moving"])
def test_registration_pair_files_verify(dataset, tmp_path, fixed_from):
    """The saved fields reproduce the pair from the files: fixed = warp(source, composed), ≈ warp(moving, ddf)."""
    from drdm.diffusion import DeformationDiffusion
    from drdm.io import read_ddf
    from drdm.networks import RecoveryNet
    from drdm.sampler import warp_intensities
    from drdm.workflows import RegistrationPairWorkflow

    torch.manual_seed(0)
    net = RecoveryNet(3, 1, channels=(2, 4, 8), embed_dim=8)
    items = [{"image": str(dataset / "img" / "case_a.nii.gz"), "label": str(dataset / "lab" / "case_a.nii.gz")}]
    wf = RegistrationPairWorkflow(
        items, net, DeformationDiffusion(control_size=16), tmp_path, level_pairs=[[8, 8]], fixed_from=fixed_from
    )
    (rep,) = wf.run()
    files = {k: tmp_path / v for k, v in rep["files"].items()}
    source = read_volume(rep["source_image"], 3)[None].as_tensor()
    moving, fixed = (read_volume(files[k], 3)[None].as_tensor() for k in ("moving", "fixed"))
    ddf, aug, composed = (read_ddf(files[k], 3)[None] for k in ("ddf", "aug_ddf", "composed_ddf"))
    assert aug.norm(dim=1).mean() > 0.1 and ddf.norm(dim=1).mean() > 0.1
    scale = float(source.max() - source.min())
    assert torch.allclose(moving, warp_intensities(source, aug), atol=1e-4 * scale)  # one interpolation
    via_source = (fixed - warp_intensities(source, composed)).abs() / scale
    via_moving = (fixed - warp_intensities(moving, ddf)).abs() / scale
    exact, approx = (via_source, via_moving) if fixed_from == "source" else (via_moving, via_source)
    assert exact.max() < 1e-5  # exact up to float32 rounding
    # the other identity holds up to one extra bilinear interpolation. Stated tolerance (of the intensity range):
    # mean < 3 % over the image, which includes the border where moving took background from outside the grid
    # (measured 2.1 %); at least 3 voxels inside, mean < 0.5 % and max < 2 % (measured 0.23 % and 0.92 %)
    inner = approx[..., 3:-3, 3:-3, 3:-3]
    assert approx.mean() < 0.03 and inner.mean() < 0.005 and inner.max() < 0.02
    key = "fixed_vs_warped_source" if fixed_from == "moving" else "fixed_vs_warped_moving"
    assert rep[key]["mean_pct"] == pytest.approx(100 * float(approx.mean()), rel=1e-3, abs=1e-4)
    lab, fixed_lab = (np.asarray(nib.load(files[k]).dataobj) for k in ("moving_label", "fixed_label"))
    src_lab = set(np.unique(np.asarray(nib.load(items[0]["label"]).dataobj)))
    assert set(np.unique(lab)) <= src_lab and set(np.unique(fixed_lab)) <= src_lab

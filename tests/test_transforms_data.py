"""Transforms and pipelines on every data kind, normalisation round trips, and every bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.data import DataLoader, Dataset
from PIL import Image

from data_prep.synthetic_np import generate
from ddcore.datalist import load_datalist
from transforms.intensity import NORM_META_KEY, RobustNormalised, denormalise
from transforms.pipelines import brats_slice_pipeline, brats_volume_pipeline, microscopy_pipeline, np_pipeline
from transforms.slices import RandAxialSliced, iter_slices, stack_slices

KEYS = ["np_signal", "vessel", "nuclei"]
BRATS = ["t1", "t1c", "t2", "flair"]  # the pipelines take the modality list from their caller
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn") / "ds", n=10, size=16, seed=0, preview=False)


def _nii(path, data, zooms=(1.0, 1.0, 1.0)):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([*zooms, 1.0])), str(path))
    return str(path)


def _brain(tmp_path, shape=(20, 18, 12)):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = zz**2 + yy**2 + xx**2 < 0.6
    item = {}
    for i, key in enumerate(("t1", "t1c", "t2", "flair")):
        vol = np.where(inside, 100 + 50 * i + RNG.normal(0, 10, shape), 0.0)
        item[key] = _nii(tmp_path / f"{key}.nii.gz", vol)
    item["seg"] = _nii(tmp_path / "seg.nii.gz", inside & (xx > 0.3))
    return item, inside


# ----------------------------------------------------------------- NP tiles
def test_synthetic_np_pipeline_batch_and_exact_inverse(synthetic):
    items = load_datalist(synthetic, "training", KEYS)
    batch = next(iter(DataLoader(Dataset(items[:3], np_pipeline(KEYS)), batch_size=3)))
    for key in KEYS:
        x = batch[key]
        assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    params = batch["np_signal"].meta[NORM_META_KEY]
    back = denormalise(batch["np_signal"], params)
    for b in range(3):
        raw = np.asarray(Image.open(items[b]["np_signal"])).astype(np.float64)
        np.testing.assert_allclose(back[b, 0].numpy(), raw, atol=0.05)
    assert batch["divergence_kind"][0] in ("none", "swapped", "shifted", "rotated")


@pytest.mark.parametrize("keep_rgb", [False, True])
def test_official_rgb_pseudocolour(tmp_path, keep_rgb):
    red = RNG.integers(0, 256, (12, 10)).astype(np.uint8)
    files = {}
    for key, ch in zip(KEYS, (0, 1, 2)):
        rgb = np.zeros((12, 10, 3), np.uint8)
        rgb[..., ch] = red
        files[key] = str(tmp_path / f"{key}.png")
        Image.fromarray(rgb).save(files[key])
    out = np_pipeline(KEYS, source="official", keep_rgb=keep_rgb)(files)
    expected = red / 255.0 * 2 - 1
    for ch, key in enumerate(KEYS):
        x = out[key]
        if keep_rgb:
            assert x.shape == (3, 12, 10)
            np.testing.assert_allclose(x[ch].numpy(), expected, atol=1e-6)
        else:
            assert x.shape == (1, 12, 10)  # numpy row/column order, like the file
            np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)


def test_microscopy_tiff_percentile_and_compose_inverse(tmp_path):
    a = RNG.integers(0, 4000, (20, 24)).astype(np.uint16)
    item = {"dna": str(tmp_path / "dna.tif"), "ph3": str(tmp_path / "ph3.tif")}
    tifffile.imwrite(item["dna"], a)
    tifffile.imwrite(item["ph3"], a[::-1].copy())
    pipe = microscopy_pipeline(["dna", "ph3"], lower=0, upper=100)
    out = pipe(item)
    assert out["dna"].shape == (1, 20, 24)
    assert float(out["dna"].min()) == -1.0 and float(out["dna"].max()) == 1.0
    assert out["dna"].meta[NORM_META_KEY]["upper"] == float(a.max())
    back = pipe.inverse(out)
    np.testing.assert_allclose(back["dna"][0].numpy(), a, rtol=1e-5, atol=1e-2)
    crop = microscopy_pipeline(["dna", "ph3"], crop_size=8)(item)
    assert crop["dna"].shape == (1, 8, 8)


# ----------------------------------------------------------------- normalisation
@pytest.mark.parametrize("spatial", [(9, 7), (6, 5, 4)])
@pytest.mark.parametrize("mode", ["percentile", "fixed"])
def test_normalisation_round_trip(spatial, mode):
    x = torch.as_tensor(RNG.normal(50, 20, (1, *spatial)), dtype=torch.float32)
    mask = torch.zeros_like(x)
    mask[(0, *(slice(1, -1),) * len(spatial))] = 1
    t = RobustNormalised("img", mode=mode, value_range=(-100, 300), mask_key="mask", clip=False, lower=2, upper=98)
    out = t({"img": x, "mask": mask})
    params = out["img"].meta[NORM_META_KEY]
    if mode == "percentile":
        inner = x[mask > 0].double()
        assert params["lower"] == pytest.approx(float(torch.quantile(inner, 0.02)))
        assert params["upper"] == pytest.approx(float(torch.quantile(inner, 0.98)))
    torch.testing.assert_close(denormalise(out["img"], params).as_tensor(), x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(t.inverse(out)["img"].as_tensor(), x, atol=1e-4, rtol=1e-5)


def test_normalisation_clips_and_hand_computed():
    x = torch.tensor([[0.0, 5.0, 10.0, 20.0]])
    out = RobustNormalised("img", mode="fixed", value_range=(0, 10))({"img": x})["img"]
    torch.testing.assert_close(torch.as_tensor(out), torch.tensor([[-1.0, 0.0, 1.0, 1.0]]))


# ----------------------------------------------------------------- BraTS volumes and slices
def test_brats_volume_slices_and_reassembly(tmp_path):
    item, inside = _brain(tmp_path)
    vol = brats_volume_pipeline(BRATS, seg_key="seg")(item)
    assert vol["t1"].shape == vol["seg"].shape == vol["brain_mask"].shape
    assert vol["t1"].shape[1:] == tuple(int(i) for i in np.ptp(np.array(np.nonzero(inside)), axis=1) + 1)
    brain = vol["brain_mask"] > 0
    assert float(vol["flair"][~brain].max()) == -1.0  # background -> -1
    assert vol["flair"].meta[NORM_META_KEY]["lower"] > 50  # percentiles inside the brain, not the zeros
    slices = list(iter_slices(vol, ["t1", "seg"]))
    assert len(slices) == vol["t1"].shape[-1] and slices[3]["t1"].shape == (1, *vol["t1"].shape[1:3])
    torch.testing.assert_close(stack_slices([s["t1"] for s in slices]), vol["t1"].as_tensor())
    pipe = brats_slice_pipeline(BRATS, seg_key="seg", spatial_size=16, min_foreground=0.3, num_samples=4)
    pipe.set_random_state(1)
    samples = pipe(item)
    assert len(samples) == 4
    for s in samples:
        assert s["t1"].shape == s["seg"].shape == (1, 16, 16)
        assert s["t1"].meta["slice_axis"] == 2
        assert int((s["brain_mask"] > 0).sum()) >= 0.3 * vol["t1"].shape[1] * vol["t1"].shape[2]


def test_rand_axial_slice_respects_min_foreground():
    mask = torch.zeros(1, 4, 4, 6)
    mask[..., 2] = 1  # only slice 2 is foreground
    t = RandAxialSliced(["img"], foreground_key="mask", min_foreground=0.5, num_samples=3)
    out = t({"img": torch.arange(96.0).reshape(1, 4, 4, 6), "mask": mask})
    assert [o["img"].shape for o in out] == [(1, 4, 4)] * 3
    torch.testing.assert_close(torch.as_tensor(out[0]["img"]), torch.arange(96.0).reshape(1, 4, 4, 6)[..., 2])
    with pytest.raises(ValueError, match=r"no slice .* >= 0\.5"):
        t({"img": torch.zeros(1, 4, 4, 6), "mask": torch.zeros(1, 4, 4, 6)})


# ----------------------------------------------------------------- bad input
def _png(path, arr):
    Image.fromarray(arr).save(path)
    return str(path)


def test_bad_missing_and_truncated_files(tmp_path):
    good = _png(tmp_path / "v.png", RNG.integers(0, 255, (8, 8)).astype(np.uint8))
    with pytest.raises(FileNotFoundError, match=r"'nuclei'.*nope\.png"):
        microscopy_pipeline(["vessel", "nuclei"])({"vessel": good, "nuclei": str(tmp_path / "nope.png")})
    data = (tmp_path / "v.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"'nuclei': cannot read .*t\.png"):
        microscopy_pipeline(["vessel", "nuclei"])({"vessel": good, "nuclei": str(tmp_path / "t.png")})
    (tmp_path / "t.nii.gz").write_bytes(b"\x1f\x8b\x08\x00trunc")
    with pytest.raises(ValueError, match=r"'t1': cannot read .*t\.nii\.gz"):
        brats_volume_pipeline(["t1"])({"t1": str(tmp_path / "t.nii.gz")})


@pytest.mark.parametrize(("value", "what"), [(np.nan, "1 NaN"), (np.inf, "1 Inf")])
def test_bad_non_finite(tmp_path, value, what):
    arr = np.ones((8, 8), np.float32)
    arr[2, 3] = value
    tifffile.imwrite(tmp_path / "a.tif", arr)
    with pytest.raises(ValueError, match=rf"'a' \(.*a\.tif\): 1 non-finite values \(.*{what}"):
        microscopy_pipeline(["a"])({"a": str(tmp_path / "a.tif")})


def test_bad_constant_image(tmp_path):
    path = _png(tmp_path / "c.png", np.full((8, 8), 7, np.uint8))
    with pytest.raises(ValueError, match=r"'nuclei' \(.*c\.png\): constant image"):
        microscopy_pipeline(["nuclei"])({"nuclei": path})
    out = microscopy_pipeline(["nuclei"], allow_constant=True)({"nuclei": path})
    assert float(out["nuclei"].max()) == -1.0


def test_bad_shape_mismatch_2d(tmp_path):
    a = _png(tmp_path / "a.png", RNG.integers(0, 255, (8, 8)).astype(np.uint8))
    b = _png(tmp_path / "b.png", RNG.integers(0, 255, (8, 9)).astype(np.uint8))
    with pytest.raises(ValueError, match=r"not co-registered: shape of 'b' \(8, 9\).*a\.png.*b\.png"):
        microscopy_pipeline(["a", "b"])({"a": a, "b": b})


def test_bad_spacing_mismatch_3d(tmp_path):
    vol = RNG.normal(size=(6, 5, 4)) + 5
    item = {"t1": _nii(tmp_path / "t1.nii.gz", vol), "t2": _nii(tmp_path / "t2.nii.gz", vol, zooms=(1, 1, 2))}
    with pytest.raises(ValueError, match=r"spacing of 't2' \[1.0, 1.0, 2.0\].*t2\.nii\.gz"):
        brats_volume_pipeline(["t1", "t2"])(item)


def test_bad_dimensionality(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", RNG.integers(0, 255, (5, 8, 8)).astype(np.uint8))
    with pytest.raises(ValueError, match=r"'a' \(.*stack\.tif\): expected a 2D image.*got 3D"):
        microscopy_pipeline(["a"])({"a": str(tmp_path / "stack.tif")})
    flat = _nii(tmp_path / "flat.nii.gz", RNG.normal(size=(6, 5)))
    with pytest.raises(ValueError, match=r"'t1' \(.*flat\.nii\.gz\): expected a 3D volume.*got 2D"):
        brats_volume_pipeline(["t1"])({"t1": flat})


# ----------------------------------------------------------------- shared example data
@pytest.mark.shared_data
def test_shared_brats_case(shared_data):
    case = shared_data / "brats" / "TCGA-DU-7294"
    item = {k: str(case / f"{k}.nii.gz") for k in ("t1", "t1c", "t2", "flair", "seg")}
    pipe = brats_slice_pipeline(BRATS, seg_key="seg", spatial_size=(192, 192), min_foreground=0.2, num_samples=2)
    pipe.set_random_state(0)
    samples = pipe(item)
    for s in samples:
        assert s["flair"].shape == (1, 192, 192) and s["seg"].shape == (1, 192, 192)
        brain = s["brain_mask"] > 0
        assert int(brain.sum()) >= 0.2 * 120 * 150  # the brain's bounding box is larger than 120 x 150
        assert float(s["flair"].min()) >= -1.0 and float(s["flair"].max()) <= 1.0
        assert float(s["flair"][brain].std()) > 0.1
        assert set(torch.unique(s["seg"]).tolist()) <= {0.0, 1.0, 2.0}


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("folder", "names"),
    [("fly", ["POS002_dapi", "POS002_fitc", "POS002_rhodamine"]), ("human", ["dna", "cellbody", "ph3"])],
)
def test_shared_microscopy(shared_data, folder, names):
    item = {n.split("_")[-1]: str(shared_data / "microscopy" / folder / f"{n}.tif") for n in names}
    out = microscopy_pipeline(list(item), crop_size=128, random_crop=False)(item)
    for key in item:
        x = out[key]
        assert x.shape == (1, 128, 128) and x.dtype == torch.float32
        p = x.meta[NORM_META_KEY]
        assert 0 <= p["lower"] < p["upper"] <= 255
        back = denormalise(x, p)
        raw = tifffile.imread(item[key]).astype(np.float32)
        h, w = raw.shape
        centre = raw[(h - 128) // 2 : (h - 128) // 2 + 128, (w - 128) // 2 : (w - 128) // 2 + 128]
        inside = (centre >= p["lower"]) & (centre <= p["upper"])
        np.testing.assert_allclose(back[0].numpy()[inside], centre[inside], atol=1e-3)


def test_content_checks_complex_float_labels_and_saturation(tmp_path):
    """Complex NIfTI is refused before the float cast; float labels; a float TIFF x1e12 warns about clipping."""
    from transforms.checks import CheckIntegerLabelsd, WarnSaturationd
    from transforms.loading import LoadImageCheckedd

    path = tmp_path / "c.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3), np.complex64), np.eye(4)), str(path))
    with pytest.raises(ValueError, match=r"modality 'x': .*c\.nii\.gz holds complex-valued data \(complex64\)"):
        LoadImageCheckedd("x")({"x": str(path)})
    with pytest.raises(ValueError, match=r"not an integer label map: 1 non-integer values \(e\.g\. 0\.5\)"):
        CheckIntegerLabelsd("seg")({"seg": torch.tensor([[0.0, 1.0, 0.5, 2.0]])})
    with pytest.raises(ValueError, match="negative label -1"):
        CheckIntegerLabelsd("seg")({"seg": torch.tensor([[0.0, -1.0]])})
    CheckIntegerLabelsd("seg")({"seg": torch.tensor([[0.0, 1.0, 2.0, 4.0]])})  # float storage of integers is fine
    tiff = tmp_path / "big.tif"
    tifffile.imwrite(tiff, (np.random.default_rng(0).random((16, 16)) * 1e12).astype(np.float32))
    pipe = np_pipeline(["np_signal"])  # fixed range 0..65535
    with pytest.warns(RuntimeWarning, match=r"modality 'np_signal' \(.*big\.tif\): 100\.0 % of the values lie outside"):
        out = pipe({"np_signal": str(tiff)})
    assert float(out["np_signal"].min()) == 1.0  # everything clipped, as warned
    ok = {"np_signal": torch.full((1, 10, 10), 100.0)}
    ok["np_signal"][0, 0, 0] = 70000.0  # 1 % clipped: at the threshold, no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        WarnSaturationd("np_signal", (0, 65535))(ok)

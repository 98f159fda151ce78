"""Evaluation metrics, tables, montage and the geometry-keeping output writers."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from damm.evaluation import format_table, per_item_metrics, summarise, write_montage
from damm.outputs import read_reference_info, to_input_scale, write_confidence_like, write_image_like


def test_per_item_metrics_hand_computed():
    target = torch.full((3, 1, 16, 16), -1.0)  # 0 in [0, 1]
    pred = target.clone()
    pred[0] += 0.2  # 0.1 in [0, 1] everywhere -> MAE 0.1, MSE 0.01 -> PSNR 20 dB
    pred[1] += 0.02  # 0.01 -> PSNR 40 dB
    pred[2, :, :8] += 2.0  # half the image at 1.0 -> MAE 0.5, MSE 0.5 -> PSNR 3.01 dB
    m = per_item_metrics(pred, target, ssim_win_size=7)
    assert m["mae"] == pytest.approx([0.1, 0.01, 0.5], abs=1e-5)
    assert m["psnr"] == pytest.approx([20.0, 40.0, 10 * math.log10(2)], abs=1e-3)
    same = per_item_metrics(target + 0.5, target + 0.5, ssim_win_size=7)
    assert same["ssim"] == pytest.approx([1.0] * 3, abs=1e-5)
    # values outside [-1, 1] are clamped before comparison
    clamped = per_item_metrics(target - 5.0, target, ssim_win_size=7)
    assert clamped["mae"] == pytest.approx([0.0] * 3, abs=1e-6)


def test_summarise_subsets():
    values = {"psnr": np.array([10.0, 20.0, 30.0, 40.0])}
    s = summarise(values, np.array([False, True, False, True]))
    assert s["all"]["psnr"] == 25.0 and s["all"]["n"] == 4
    assert s["consistent"]["psnr"] == 20.0 and s["divergent"]["psnr"] == 30.0
    assert s["divergent"]["psnr_std"] == pytest.approx(10.0)
    assert set(summarise(values, None)) == {"all"}


def _results():
    def rec(p, g=None):
        r = {
            s: {"n": 2, "psnr": p + i, "ssim": 0.5, "mae": 0.1}
            for i, s in enumerate(("all", "consistent", "divergent"))
        }
        r["seconds"] = 1.0
        if g is not None:
            r["gated_multi_fraction"] = {"all": g, "consistent": 0.8, "divergent": 0.2}
        return r

    return {
        "n_items": 4,
        "n_divergent": 2,
        "metric_space": "unit",
        "methods": {"autoencoder_ceiling": rec(30), "damm": rec(20, 0.5), "uni": rec(19), "multi": rec(21)},
        "claim": {"all": {"psnr": {"damm_minus_best_branch": -1.0}, "ssim": {"damm_minus_best_branch": 0.0}}},
    }


def test_format_table_rows_and_claim():
    table = format_table(_results())
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| method | PSNR all | PSNR consistent | PSNR divergent")
    damm = next(line for line in lines if line.startswith("| damm |"))
    assert "20.00 | 21.00 | 22.00" in damm and "0.80 / 0.20" in damm
    assert "damm - best branch = -1.00 dB" in table


def test_montage_layout(tmp_path):
    n, size = 4, 8
    images = {k: torch.rand(n, 1, size, size) * 2 - 1 for k in ("np_signal", "vessel", "nuclei")}
    preds = {b: torch.rand(n, 1, size, size) * 2 - 1 for b in ("damm", "uni", "multi")}
    preds["confidence"] = torch.rand(n, 1, size, size)
    info = [{"id": f"t{i}", "divergent": i % 2 == 1} for i in range(n)]
    path = write_montage(tmp_path / "m.png", images, preds, info, ["vessel", "nuclei"], "np_signal", rows_per_group=2)
    img = Image.open(path)
    # 7 columns (2 conditions, target, 3 branches, confidence), 4 rows, tiles scaled x2 plus padding
    assert img.size == (120 + 7 * (2 * size + 4), 18 + 4 * (2 * size + 4))
    arr = np.asarray(img)
    tile = arr[18 : 18 + 2 * size, 120 : 120 + 2 * size]
    expected = ((images["vessel"][0, 0] + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(tile[::2, ::2], expected)


@pytest.mark.parametrize(
    ("fmt", "dtype"), [("png", np.uint8), ("png", np.uint16), ("tif", np.uint16), ("tif", np.float32)]
)
def test_write_image_like_keeps_format_shape_dtype(tmp_path, fmt, dtype):
    ref = tmp_path / f"ref.{fmt}"
    arr = (np.arange(24 * 20).reshape(24, 20) % 200).astype(dtype)
    if fmt == "png":
        Image.fromarray(arr).save(ref)
    else:
        tifffile.imwrite(ref, arr)
    pred = torch.linspace(-1, 1, 24 * 20).reshape(1, 24, 20)
    hi = 1.0 if dtype == np.float32 else float(np.iinfo(dtype).max)
    out = write_image_like(pred, ref, tmp_path / "out", value_range=(0.0, hi))
    assert out.suffix == f".{fmt}"
    back = np.asarray(Image.open(out)) if fmt == "png" else tifffile.imread(out)
    assert back.shape == arr.shape and back.dtype == arr.dtype
    assert back.flat[0] == 0 and back.flat[-1] == pytest.approx(hi)
    conf = write_confidence_like(torch.rand(1, 24, 20), ref, tmp_path / "conf")
    assert tifffile.imread(conf).shape == (24, 20)
    with pytest.raises(ValueError, match="does not match the input geometry"):
        write_image_like(torch.zeros(1, 12, 10), ref, tmp_path / "bad", value_range=(0.0, hi))


def test_write_image_like_nifti_keeps_affine(tmp_path):
    affine = np.array([[0.0, -1.2, 0.0, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])
    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), affine), ref)
    pred = torch.zeros(1, 6, 5, 4)
    out = write_image_like(pred, ref, tmp_path / "pred", value_range=(0.0, 100.0))
    assert out.name == "pred.nii.gz"
    img = nib.load(out)
    assert img.shape == (6, 5, 4) and np.allclose(img.affine, affine)
    assert np.allclose(np.asarray(img.dataobj), 50.0)
    conf = nib.load(write_confidence_like(torch.full((1, 6, 5, 4), 0.25), ref, tmp_path / "conf"))
    assert np.allclose(conf.affine, affine) and np.allclose(np.asarray(conf.dataobj), 0.25)
    assert read_reference_info(ref)["format"] == "nifti"


def test_to_input_scale_rounds_and_clips():
    y = to_input_scale(np.array([-1.5, -1.0, 0.0, 1.0]), (0, 255), "uint8")
    assert y.dtype == np.uint8 and y.tolist() == [0, 0, 128, 255]

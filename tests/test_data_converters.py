"""Converters (damm_folders, brats, microscopy) on temporary folders built here."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from data_prep import brats, damm_folders, microscopy
from ddcore.datalist import SPLITS, load_datalist

RNG = np.random.default_rng(0)


def _rgb_jpeg(path, channel):
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[..., channel] = RNG.integers(0, 255, (16, 16))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


def _official(root, names=("IMG1_001", "IMG1_002", "IMG2_001", "IMG2_002", "IMG3_001")):
    for name in names:
        for folder, ch in (("QD", 0), ("CD31", 1), ("DAPI", 2)):
            _rgb_jpeg(root / folder / f"{name}.jpg", ch)
    return root


# ---------------------------------------------------------------- damm_folders
def test_damm_official_layout(tmp_path):
    root = _official(tmp_path / "data")
    path = damm_folders.convert(root, group_regex=r"^(IMG\d+)_", val_fraction=0.34, test_fraction=0.34)
    data = json.loads(path.read_text())
    assert data["layout"] == "official" and data["modalities"] == ["np_signal", "vessel", "nuclei"]
    items = [i for s in SPLITS for i in data[s]]
    assert len(items) == 5
    assert items[0]["np_signal"].startswith("QD/") and items[0]["nuclei"].startswith("DAPI/")
    split_of_group = {}
    for s in SPLITS:
        for i in data[s]:
            assert split_of_group.setdefault(i["group"], s) == s  # a slide never spans two splits
    assert set(split_of_group.values()) == set(SPLITS)


def test_damm_our_layout_and_cli(tmp_path, capsys):
    root = tmp_path / "ours"
    for name in ("a", "b", "c"):
        for folder in ("np", "vessel", "nuclei"):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(RNG.integers(0, 65535, (8, 8)).astype(np.uint16)).save(root / folder / f"{name}.png")
    out = tmp_path / "dl" / "list.json"
    assert damm_folders.main([str(root), "--datalist", str(out)]) == 0
    items = load_datalist(out, "training", ["np_signal", "vessel", "nuclei"])
    assert items and all(i["vessel"].endswith(".png") for i in items)


def test_damm_mismatched_names_listed(tmp_path):
    root = _official(tmp_path / "data", names=("x1", "x2"))
    _rgb_jpeg(root / "QD" / "only_qd.jpg", 0)
    (root / "DAPI" / "x2.jpg").unlink()
    with pytest.raises(ValueError, match=r"CD31/ lacks 1 image.*only_qd.*DAPI/ lacks 2 image.*only_qd, x2"):
        damm_folders.convert(root)
    assert not (root / "datalist.json").exists()


def test_damm_missing_folder_and_unreadable(tmp_path):
    root = _official(tmp_path / "data", names=("x1",))
    (root / "CD31" / "x1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"unreadable or truncated image file .*CD31.*x1\.jpg"):
        damm_folders.convert(root)
    for f in (root / "DAPI").iterdir():
        f.unlink()
    (root / "DAPI").rmdir()
    with pytest.raises(ValueError, match=r"missing folder\(s\) \['DAPI'\]"):
        damm_folders.convert(root)
    assert not (root / "datalist.json").exists()


# ---------------------------------------------------------------- brats
def _nii(path, shape=(6, 5, 4), zooms=(1.0, 1.0, 1.0), value=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(np.full(shape, value, np.float32), affine), str(path))


NAMES = {
    "brats2021": ("BraTS2021_{i:05d}", "{s}_t1", "{s}_t1ce", "{s}_t2", "{s}_flair", "{s}_seg"),
    "brats2023": ("BraTS-GLI-{i:05d}-000", "{s}-t1n", "{s}-t1c", "{s}-t2w", "{s}-t2f", "{s}-seg"),
    "plain": ("case{i}", "t1", "t1c", "t2", "flair", "seg"),
}


@pytest.mark.parametrize("scheme", sorted(NAMES))
def test_brats_schemes_subject_split_and_incomplete(tmp_path, scheme):
    pattern, *files = NAMES[scheme]
    root = tmp_path / "brats"
    for i in range(10):
        subject = pattern.format(i=i)
        for key, f in zip(("t1", "t1c", "t2", "flair", "seg"), files):
            if i == 9 and key == "t2":
                continue  # incomplete subject
            _nii(root / subject / (f.format(s=subject) + ".nii.gz"))
    data = json.loads(brats.convert(root).read_text())
    assert data["modalities"] == ["t1", "t1c", "t2", "flair"] and data["labels"] == ["seg"]
    subjects = {s: [i["subject"] for i in data[s]] for s in SPLITS}
    assert sum(map(len, subjects.values())) == 9 and all(subjects.values())
    (inc,) = data["incomplete"]
    last = pattern.format(i=9)
    assert inc["subject"] == last and inc["missing"] == ["t2"] and inc["scheme"] == scheme
    assert inc["expected_files"]["t2"] == files[2].format(s=last) + ".nii.gz"
    item = data["training"][0]
    assert item["scheme"] == scheme
    assert item["t1c"].endswith(files[1].format(s=item["subject"]) + ".nii.gz")
    loaded = load_datalist(root / "datalist.json", "training", ["t1", "t1c", "t2", "flair", "seg"])
    assert all(v.startswith(str(root)) for v in (loaded[0]["t1"], loaded[0]["seg"]))


def test_brats_flat_2023_and_modality_filename(tmp_path):
    root = tmp_path / "flat"
    for sub in ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000"):
        for tag in ("t1n", "t1c", "t2w", "t2f"):
            _nii(root / f"{sub}-{tag}.nii.gz")
    data = json.loads(brats.convert(root, val_fraction=0, test_fraction=0).read_text())
    assert sorted(i["subject"] for i in data["training"]) == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    assert data["labels"] == []
    assert brats.modality_filename("brats2023", "flair", "BraTS-GLI-00002-000") == "BraTS-GLI-00002-000-t2f.nii.gz"
    assert brats.modality_filename("brats2021", "t1c", "BraTS2021_00007") == "BraTS2021_00007_t1ce.nii.gz"
    assert brats.modality_filename("plain", "t2", ext=".nii") == "t2.nii"
    with pytest.raises(ValueError, match="prefix"):
        brats.modality_filename("brats2021", "t1")
    with pytest.raises(ValueError, match="unknown modality"):
        brats.modality_filename("plain", "pd")


def test_brats_bad_inputs(tmp_path):
    root = tmp_path / "b"
    for key in ("t1", "t1c", "t2", "flair"):
        _nii(root / "s1" / f"{key}.nii.gz")
    _nii(root / "s1" / "t2.nii.gz", zooms=(1.0, 1.0, 2.0))  # different spacing
    with pytest.raises(ValueError, match=r"subject 's1'.*\['t2'\] are not on the grid.*spacing"):
        brats.convert(root)
    _nii(root / "s1" / "t2.nii.gz", shape=(6, 5, 3))  # different shape
    with pytest.raises(ValueError, match=r"t2\.nii\.gz shape=\(6, 5, 3\)"):
        brats.convert(root)
    _nii(root / "s1" / "t2.nii.gz", shape=(6, 5))  # 2D where 3D expected
    with pytest.raises(ValueError, match=r"is 2D.*expected a 3D volume"):
        brats.convert(root)
    (root / "s1" / "t2.nii.gz").write_bytes(b"\x1f\x8b garbage")  # unreadable
    with pytest.raises(ValueError, match=r"cannot read 't2' file .*t2\.nii\.gz"):
        brats.convert(root)
    _nii(root / "s1" / "t2.nii.gz")
    _nii(root / "s1" / "s1_flair.nii.gz")  # mixed schemes
    with pytest.raises(ValueError, match="mixed naming schemes"):
        brats.convert(root)
    assert not (root / "datalist.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no BraTS subject"):
        brats.convert(tmp_path / "empty")


# ---------------------------------------------------------------- microscopy
def _fields(root):
    fly = root / "fly"
    fly.mkdir(parents=True)
    for field in ("POS001", "POS002", "POS003", "POS004"):
        for ch in ("dapi", "fitc"):
            tifffile.imwrite(fly / f"{field}_{ch}.tif", RNG.integers(0, 255, (40, 36)).astype(np.uint8))
    return fly


def test_microscopy_tiles_and_field_split(tmp_path):
    fly = _fields(tmp_path)
    out = tmp_path / "tiles"
    path = microscopy.convert(
        fly, out, tile_size=16, rename={"dapi": "nuclei"}, val_fraction=0.25, test_fraction=0.25, seed=0
    )
    data = json.loads(path.read_text())
    assert data["modalities"] == ["nuclei", "fitc"]
    assert all(len(data["fields"][s]) == (2 if s == "training" else 1) for s in SPLITS)
    field_split = {}
    for s in SPLITS:
        for item in data[s]:
            assert field_split.setdefault(item["field"], s) == s
    # 40x36 with 16-px tiles: rows at 0, 16, 24; columns at 0, 16, 20 -> 9 tiles per field
    assert sum(len(data[s]) for s in SPLITS) == 36
    item = data["training"][0]
    src = tifffile.imread(fly / f"{item['field']}_dapi.tif")
    tile = tifffile.imread(out / item["nuclei"])
    np.testing.assert_array_equal(tile, src[item["y"] : item["y"] + 16, item["x"] : item["x"] + 16])
    assert microscopy.tile_positions(40, 16, 16) == [0, 16, 24]


def test_tile_positions_last_tile_flush_with_the_border():
    """MONAI's dense_patch_slices along one axis, also with gaps between tiles (stride > tile)."""
    from damm.tasks.microscopy_files import tile_positions

    assert tile_positions(40, 16, 16) == [0, 16, 24]
    assert tile_positions(48, 16, 16) == [0, 16, 32]
    assert tile_positions(40, 16, 8) == [0, 8, 16, 24]
    assert tile_positions(16, 16, 4) == [0]
    assert tile_positions(512, 32, 64) == [0, 64, 128, 192, 256, 320, 384, 448, 480]
    assert tile_positions(100, 32, 50) == [0, 50, 68]
    with pytest.raises(ValueError, match="tile <= length"):
        tile_positions(10, 16, 4)


def test_microscopy_one_folder_per_field_and_forced_split(tmp_path):
    for field in ("f1", "f2"):
        for ch in ("dna", "ph3"):
            (tmp_path / "human" / field).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(tmp_path / "human" / field / f"{ch}.tif", np.ones((20, 20), np.uint8))
    assert sorted(microscopy.find_fields(tmp_path / "human")) == ["f1", "f2"]
    path = microscopy.convert(tmp_path / "human", tmp_path / "out", tile_size=20, test_fields=["f2"])
    data = json.loads(path.read_text())
    assert data["fields"]["test"] == ["f2"] and data["fields"]["training"] == ["f1"]


def test_microscopy_bad_inputs_write_nothing(tmp_path):
    fly = _fields(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="smaller than the tile size"):
        microscopy.convert(fly, out, tile_size=64)
    (fly / "POS004_fitc.tif").unlink()
    with pytest.raises(ValueError, match=r"POS004: missing \['fitc'\]"):
        microscopy.convert(fly, out, tile_size=16)
    tifffile.imwrite(fly / "POS004_fitc.tif", np.zeros((40, 30), np.uint8))
    with pytest.raises(ValueError, match=r"'POS004'.*not on the grid.*POS004_fitc\.tif shape=\(40, 30\)"):
        microscopy.convert(fly, out, tile_size=16)
    tifffile.imwrite(fly / "POS004_fitc.tif", np.zeros((3, 40, 36), np.uint8))
    with pytest.raises(ValueError, match=r"POS004_fitc\.tif: expected a 2D"):
        microscopy.convert(fly, out, tile_size=16)
    (fly / "POS004_fitc.tif").write_bytes(b"II*\x00trunc")
    with pytest.raises(ValueError, match=r"unreadable or truncated image file .*POS004_fitc\.tif"):
        microscopy.convert(fly, out, tile_size=16)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

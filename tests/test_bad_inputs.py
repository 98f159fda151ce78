"""The bad-input corpus against every entry point, run as a user runs them (subprocesses).

Each case asserts: a non-zero exit status (2 for the command-line tools, 1 for ``monai.bundle run``, never a
crash status such as 134), one ``error: ...`` line as the last line of stderr naming the culprit (file, key or
setting), no traceback on the terminal, and no output files. The bundle runs fail before any training step.

Selected with ``-m fault_injection`` (skipped otherwise; about 2 minutes on 2 cores):
``python -m pytest -q -p no:cacheprovider -m fault_injection tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from ddcore.atomic import is_temporary

pytestmark = pytest.mark.fault_injection

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
RNG = np.random.default_rng(0)
KEYS = ("np_signal", "vessel", "nuclei")
TINY = [
    "--ae_channels", "[8,8,8]", "--dm_channels", "[8,8,8,8]", "--dm_time_embed_dim", "16",
    "--ae_iterations", "4", "--ae_batch_size", "4", "--dm_iterations", "4", "--dm_batch_size", "4",
    "--num_inference_steps", "2", "--eval_num_samples", "1", "--eval_ddpm_items", "0", "--progress", "False",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _selected(request):
    if "fault_injection" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("bad-input corpus: run with -m fault_injection")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DDCORE_DEBUG": ""}


def _run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _assert_one_line(proc: subprocess.CompletedProcess, status: int, *culprits: str) -> str:
    assert proc.returncode == status, f"exit {proc.returncode} (expected {status}):\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    for culprit in culprits:
        assert culprit in last, f"{culprit!r} not named in: {last}"
    return last


def _outputs(root: Path) -> list[Path]:
    """Files a failed run must not leave: models, evaluation, generated data, temporaries (logs are fine)."""
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and (p.suffix in (".pt", ".png", ".md") or p.name == "evaluation.json" or is_temporary(p))
    ]


# ---------------------------------------------------------------- the DAMM bundle run (monai.bundle run training)
def _tile(path: Path, array: np.ndarray | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, RNG.integers(0, 60000, (32, 32)).astype(np.uint16) if array is None else array)
    return str(path)


def _datalist(root: Path, n: int = 8, bad: dict | None = None) -> Path:
    """A datalist of ``n`` tiles per split; ``bad`` replaces key -> path of the first training item."""
    data = {}
    for split in ("training", "validation", "test"):
        data[split] = [
            {"id": f"{split}{i}", **{k: _tile(root / "tiles" / k / f"{split}{i}.tif") for k in KEYS}} for i in range(n)
        ]
    for key, value in (bad or {}).items():
        if value is None:
            del data["training"][0][key]
        else:
            data["training"][0][key] = value
    path = root / "datalist.json"
    path.write_text(json.dumps(data))
    return path


def _bundle(root: Path, datalist: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(
        [
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            str([str(CONFIGS / "common.json"), str(CONFIGS / "train.json")]),
            "--meta_file",
            str(CONFIGS / "metadata.json"),
            "--logging_file",
            str(CONFIGS / "logging.conf"),
            "--bundle_root",
            str(root / "bundle"),
            "--datalist",
            str(datalist),
            *TINY,
            *extra,
        ],
    )


def _nifti(path: Path, array: np.ndarray, dtype=None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array if dtype is None else array.astype(dtype), np.diag([1.0, 1.0, 1.0, 1.0]))
    nib.save(img, str(path))
    return str(path)


def _nan_tile(root: Path) -> str:
    a = RNG.random((32, 32)).astype(np.float32) * 1000
    a[3, 4] = np.nan
    return _tile(root / "bad" / "nan.tif", a)


BUNDLE_CASES = {
    "nan_voxel": (lambda r: {"vessel": _nan_tile(r)}, ("vessel", "nan.tif", "non-finite")),
    "complex_nifti": (
        lambda r: {"nuclei": _nifti(r / "bad" / "c.nii.gz", (RNG.random((32, 32)) + 1j).astype(np.complex64))},
        ("nuclei", "c.nii.gz", "complex"),
    ),
    "3d_in_2d_slot": (
        lambda r: {"vessel": _nifti(r / "bad" / "v3d.nii.gz", RNG.random((32, 32, 5)).astype(np.float32))},
        ("vessel", "v3d.nii.gz", "2D"),
    ),
    "channel_size_mismatch": (
        lambda r: {"nuclei": _tile(r / "bad" / "small.tif", RNG.integers(0, 9, (24, 32)).astype(np.uint16))},
        ("small.tif",),
    ),
    "missing_modality_key": (lambda r: {"nuclei": None}, ("nuclei", "training")),
    "missing_file": (lambda r: {"vessel": str(r / "nowhere.tif")}, ("vessel", "nowhere.tif")),
    "truncated_file": (
        lambda r: {"vessel": str((r / "bad").mkdir(parents=True, exist_ok=True) or _truncated(r / "bad" / "t.tif"))},
        ("vessel", "t.tif"),
    ),
}


def _truncated(path: Path) -> Path:
    _tile(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.mark.parametrize("case", sorted(BUNDLE_CASES))
def test_bundle_run_bad_item(case, tmp_path):
    make, culprits = BUNDLE_CASES[case]
    proc = _bundle(tmp_path, _datalist(tmp_path, bad=make(tmp_path)))
    _assert_one_line(proc, 1, *culprits)
    assert not _outputs(tmp_path / "bundle")


def test_bundle_run_dataset_smaller_than_a_batch(tmp_path):
    proc = _bundle(tmp_path, _datalist(tmp_path, n=3))
    _assert_one_line(proc, 1, "ae_batch_size=4", "dm_batch_size=4", "3 item(s)")
    assert not _outputs(tmp_path / "bundle")


def test_bundle_run_bad_setting(tmp_path):
    proc = _bundle(tmp_path, _datalist(tmp_path), "--precision", "fp8")
    _assert_one_line(proc, 1, "precision", "fp8")
    assert not _outputs(tmp_path / "bundle")


def test_bundle_run_missing_datalist(tmp_path):
    proc = _bundle(tmp_path, tmp_path / "nope.json")
    _assert_one_line(proc, 1, "nope.json")


# ---------------------------------------------------------------- converters
def test_damm_folders_channel_sizes_and_nan(tmp_path):
    root = tmp_path / "d"
    for folder in ("np", "vessel", "nuclei"):
        for i in range(3):
            _tile(root / folder / f"img{i}.tif")
    _tile(root / "nuclei" / "img1.tif", RNG.integers(0, 9, (20, 32)).astype(np.uint16))
    proc = _run(["-m", "data_prep.damm_folders", str(root), "--check", "full"])
    _assert_one_line(proc, 2, "img1", "differ in size")
    _tile(root / "nuclei" / "img1.tif")
    _tile(root / "vessel" / "img2.tif", np.full((32, 32), np.inf, np.float32))
    proc = _run(["-m", "data_prep.damm_folders", str(root), "--check", "full"])
    _assert_one_line(proc, 2, "img2.tif", "non-finite")
    assert not (root / "datalist.json").exists()


def _subject(root: Path, name: str, keys=("t1", "t1c", "t2", "flair"), **arrays) -> None:
    for key in keys:
        _nifti(root / name / f"{key}.nii.gz", arrays.get(key, RNG.random((8, 8, 6)).astype(np.float32)))


@pytest.mark.parametrize(
    "case",
    ["nan", "inf", "complex", "float_seg", "truncated"],
)
def test_brats_converter_content(case, tmp_path):
    root = tmp_path / "b"
    _subject(root, "s0")
    _subject(root, "s1")
    bad = RNG.random((8, 8, 6)).astype(np.float32)
    culprit = "t2.nii.gz"
    if case == "nan":
        bad[1, 2, 3] = np.nan
        _nifti(root / "s1" / "t2.nii.gz", bad)
    elif case == "inf":
        bad[1, 2, 3] = np.inf
        _nifti(root / "s1" / "t2.nii.gz", bad)
    elif case == "complex":
        _nifti(root / "s1" / "t2.nii.gz", (bad + 1j).astype(np.complex64))
    elif case == "float_seg":
        _nifti(root / "s1" / "seg.nii.gz", bad)
        culprit = "seg.nii.gz"
    else:
        path = root / "s1" / "t2.nii.gz"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    proc = _run(["-m", "data_prep.brats", str(root)])
    _assert_one_line(proc, 2, "s1", culprit)
    assert not (root / "datalist.json").exists()


def test_brats_converter_all_subjects_incomplete_lists_them(tmp_path):
    root = tmp_path / "b"
    _subject(root, "s0", keys=("t1", "t2", "flair"))
    _subject(root, "s1", keys=("t1", "t1c", "t2"))
    proc = _run(["-m", "data_prep.brats", str(root)])
    assert proc.returncode == 0, proc.stderr
    assert "incomplete" in proc.stderr
    data = json.loads((root / "datalist.json").read_text())
    assert {i["subject"]: i["missing"] for i in data["incomplete"]} == {"s0": ["t1c"], "s1": ["flair"]}
    assert data["training"] == data["validation"] == data["test"] == []


def test_microscopy_nan_field(tmp_path):
    fly = tmp_path / "fly"
    fly.mkdir()
    for field in ("POS001", "POS002"):
        for ch in ("dapi", "fitc"):
            tifffile.imwrite(fly / f"{field}_{ch}.tif", RNG.random((32, 32)).astype(np.float32))
    bad = RNG.random((32, 32)).astype(np.float32)
    bad[0, 0] = np.nan
    tifffile.imwrite(fly / "POS002_fitc.tif", bad)
    proc = _run(["-m", "data_prep.microscopy", str(fly), "--out", str(tmp_path / "out"), "--tile-size", "16"])
    _assert_one_line(proc, 2, "POS002_fitc.tif", "non-finite")
    assert not (tmp_path / "out").exists()


def test_microscopy_two_fields_say_what_is_missing_and_offer_a_tile_split(tmp_path):
    fly = tmp_path / "fly"
    fly.mkdir()
    for field in ("POS001", "POS002"):
        for ch in ("dapi", "fitc"):
            tifffile.imwrite(fly / f"{field}_{ch}.tif", RNG.integers(0, 255, (64, 64)).astype(np.uint8))
    proc = _run(["-m", "data_prep.microscopy", str(fly), "--out", str(tmp_path / "out"), "--tile-size", "16"])
    assert proc.returncode == 0, proc.stderr
    assert "validation and test split(s) are empty" in proc.stderr and "--split-unit tile" in proc.stderr
    proc = _run(
        [
            *("-m", "data_prep.microscopy", str(fly), "--out", str(tmp_path / "out2"), "--tile-size", "16"),
            *("--split-unit", "tile", "--val-fraction", "0.25", "--test-fraction", "0.25"),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out2" / "datalist.json").read_text())
    assert [len(data[s]) for s in ("training", "validation", "test")] == [16, 8, 8]  # 32 tiles of 16 px


# ---------------------------------------------------------------- DRDM
def _drdm(tmp_path: Path, image: np.ndarray, label: np.ndarray | None = None) -> subprocess.CompletedProcess:
    item = {"id": "a", "image": _nifti(tmp_path / "in" / "img.nii.gz", image)}
    if label is not None:
        item["label"] = _nifti(tmp_path / "in" / "lab.nii.gz", label)
    (tmp_path / "in" / "datalist.json").write_text(json.dumps({"training": [item]}))
    return _run(
        [
            "-m",
            "monai.bundle",
            "run",
            "augment",
            "--config_file",
            str([str(CONFIGS / "drdm_common.json"), str(CONFIGS / "drdm_augment.json")]),
            "--meta_file",
            str(CONFIGS / "metadata.json"),
            "--logging_file",
            str(CONFIGS / "logging.conf"),
            "--bundle_root",
            str(tmp_path / "bundle"),
            "--dataset_dir",
            str(tmp_path / "in"),
            "--spatial_dims",
            "2",
            "--checkpoint",
            "$None",
        ],
    )


def test_drdm_nan_image(tmp_path):
    image = RNG.random((32, 32)).astype(np.float32)
    image[5, 5] = np.nan
    proc = _drdm(tmp_path, image)
    _assert_one_line(proc, 1, "img.nii.gz", "non-finite")
    assert not list((tmp_path / "bundle").rglob("*.nii.gz"))


def test_drdm_float_label(tmp_path):
    proc = _drdm(tmp_path, RNG.random((32, 32)).astype(np.float32), RNG.random((32, 32)).astype(np.float32))
    _assert_one_line(proc, 1, "lab.nii.gz", "not an integer label map")
    assert not list((tmp_path / "bundle").rglob("*.nii.gz"))

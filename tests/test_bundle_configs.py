"""Static checks of the bundle: files, metadata schema, config consistency, duplicate keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, verify_metadata

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
CONFIGS = BUNDLE / "configs"


def test_required_files_exist():
    for rel in ("LICENSE", "configs/metadata.json", "configs/logging.conf", "docs/README.md"):
        assert (BUNDLE / rel).is_file(), rel
    for name in ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json"):
        assert (CONFIGS / name).is_file(), name
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()


def test_metadata_validates_against_vendored_schema(tmp_path):
    # verify_metadata "downloads" the schema to filepath; an existing file is used as is (offline)
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(CONFIGS / "meta_schema.json"))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "np_signal"}


def test_metadata_schema_rejects_missing_keys(tmp_path):
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="spatial_shape"):
        verify_metadata(meta_file=str(bad), filepath=str(CONFIGS / "meta_schema.json"))


@pytest.mark.parametrize(
    "files",
    [["train.json"], ["inference.json"], ["train.json", "evaluate.json"], ["train.json", "multi_gpu_train.json"]],
)
def test_configs_parse_without_duplicate_keys(files, monkeypatch):
    monkeypatch.setenv("MONAI_FAIL_ON_DUPLICATE_CONFIG", "1")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    assert "bundle_root" in parser and "device" in parser
    if "multi_gpu_train.json" in files:
        assert "$import torch.distributed as dist" in parser["imports"]  # "+imports" appended, not replaced
        assert "$import damm.workflow" in parser["imports"]


def test_inference_defaults_match_training():
    """inference.json must build the same network as train.json with default settings."""
    train = json.loads((CONFIGS / "train.json").read_text())
    infer = json.loads((CONFIGS / "inference.json").read_text())
    shared = [
        k
        for k in infer
        if (k.startswith(("ae_", "dm_")) or k in ("target", "conditions", "gamma", "confidence_source", "beta_start"))
        and k in train
    ]
    assert len(shared) >= 15
    for key in shared:
        assert infer[key] == train[key], key
    for key in ("num_train_timesteps", "beta_end", "spatial_dims", "seed"):
        assert infer[key] == train[key], key


def test_no_machine_paths_in_bundle():
    for path in BUNDLE.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".conf"):
            text = path.read_text()
            for bad in (f"/{top}/" for top in ("tmp", "work", "root", "home")):
                assert bad not in text, f"{path}: {bad}"

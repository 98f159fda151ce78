from __future__ import annotations

import json
import os

import pytest
import torch

from ddcore.atomic import atomic_path, atomic_torch_save, atomic_write_json


def test_atomic_save_round_trip(tmp_path):
    path = atomic_torch_save({"w": torch.arange(3.0)}, tmp_path / "ckpt.pt")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_failed_write_leaves_previous_file_intact(tmp_path):
    dest = atomic_write_json({"ok": 1}, tmp_path / "out.json")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("{ half written")
        raise RuntimeError("crash mid-write")
    assert json.loads(dest.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_temporary_names_are_recognised_and_cleared(tmp_path):
    from ddcore.atomic import is_temporary, remove_stale_temporaries

    seen = []
    with atomic_path(tmp_path / "checkpoint_epoch=3.pt") as tmp:
        seen.append(tmp)
        assert is_temporary(tmp)
        assert tmp.name.startswith(".checkpoint_epoch=3.") and tmp.name.endswith(".tmp.pt")
    assert not is_temporary(tmp_path / "checkpoint_epoch=3.pt")
    assert not is_temporary(tmp_path / ".hidden.pt")
    # a killed writer's leftover is removed, results are not
    leftover = tmp_path / ".model.0123456789abcdef.tmp.pt"
    leftover.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"]
    assert remove_stale_temporaries(tmp_path / "absent") == []

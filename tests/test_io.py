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


def test_atomic_folder_builds_replaces_and_leaves_recognised_temporaries(tmp_path, monkeypatch):
    import ddcore.atomic as atomic
    from ddcore.atomic import atomic_folder, is_temporary

    out = tmp_path / "dataset"
    with atomic_folder(out, lambda p: True) as tmp:
        assert is_temporary(tmp) and tmp.parent == tmp_path and tmp.name.startswith(".dataset.")
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing is visible before the block succeeds
    assert (out / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]

    with pytest.raises(RuntimeError), atomic_folder(out, lambda p: True) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("crash mid-build")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the previous folder is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]

    with pytest.raises(FileExistsError, match="not written by this tool"), atomic_folder(out, lambda p: False):
        pass

    # a killed run leaves its build folder (or the moved-away old folder): both are recognised as temporaries
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError), atomic_folder(out, lambda p: True) as crashed:
        (crashed / "b.txt").write_text("half")
        raise RuntimeError("killed")
    with atomic_folder(out, lambda p: True) as tmp:
        (tmp / "c.txt").write_text("2")
    leftovers = sorted(p for p in tmp_path.iterdir() if p.name != "dataset")
    assert len(leftovers) == 2 and all(is_temporary(p) and p.is_dir() for p in leftovers)
    assert crashed in leftovers and crashed.name.endswith(".tmp")
    assert any(p.name.endswith(".tmp-old") and (p / "data" / "a.txt").is_file() for p in leftovers)
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    assert not is_temporary(tmp_path / "dataset") and not is_temporary(tmp_path / ".dataset")

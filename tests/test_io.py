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


def test_stale_temporary_folders_and_files_are_removed_by_name(tmp_path):
    from ddcore.atomic import remove_stale_temporaries

    (tmp_path / ".synthetic_np.0123456789abcdef.tmp").mkdir()
    (tmp_path / ".synthetic_np.0123456789abcdef.tmp" / "a.png").write_bytes(b"x")
    (tmp_path / ".montage.0123456789abcdef.tmp.png").write_bytes(b"x")
    (tmp_path / ".model.fedcba9876543210.tmp.pt").write_bytes(b"x")
    (tmp_path / "model.pt").write_bytes(b"keep")
    (tmp_path / ".hidden").write_bytes(b"keep")
    removed = remove_stale_temporaries(tmp_path, "synthetic_np")
    assert [p.name for p in removed] == [".synthetic_np.0123456789abcdef.tmp"]
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == [
        ".model.fedcba9876543210.tmp.pt",
        ".montage.0123456789abcdef.tmp.png",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "model.pt"]


def test_error_line_reports_the_outermost_project_error_of_monai_wrappers():
    from ddcore.errors import error_line

    def chain():
        try:
            try:
                raise EOFError("Ran out of input")
            except EOFError as low:
                raise ValueError("checkpoint /m/c.pt cannot be read:\nEOFError") from low
        except ValueError as mid:
            try:
                raise RuntimeError("applying transform <x>") from mid
            except RuntimeError as wrap:
                raise RuntimeError('Failed to evaluate ConfigExpression: \n"$@x.run()"') from wrap

    with pytest.raises(RuntimeError) as err:
        chain()
    assert error_line(err.value) == "error: ValueError: checkpoint /m/c.pt cannot be read: | EOFError"
    assert error_line(KeyError("nuclei")) == "error: KeyError: missing key 'nuclei'"


@pytest.mark.parametrize("debug", ["", "1"])
def test_error_hook_prints_one_line_exits_1_and_logs_the_traceback(tmp_path, debug):
    import subprocess
    import sys

    log = tmp_path / "logs" / "last_error.log"
    code = (
        "from ddcore.errors import install_error_hook\n"
        f"install_error_hook({str(log)!r})\n"
        "try:\n    raise ValueError('modality x: bad')\nexcept ValueError as e:\n"
        "    raise RuntimeError('Failed to evaluate ConfigExpression: $x') from e\n"
    )
    env = {**os.environ, "DDCORE_DEBUG": debug}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ValueError: modality x: bad (full traceback in ")
    assert ("Traceback" in proc.stderr) == bool(debug)
    assert "Failed to evaluate" in log.read_text()

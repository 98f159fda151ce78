"""Crash-safe file writing shared by every part of the project.

Every checkpoint, image and report the project writes goes through :func:`atomic_path`: the data is
written to a temporary file in the destination folder, flushed to disk (``fsync``) and renamed over the
destination only once it is complete, so an interrupted run never leaves a half-written file that looks valid.
Temporary files are named ``.<name>.<token>.tmp<suffix>``; :func:`is_temporary` recognises them so that
checkpoint discovery and result globs never mistake one for a result, and :func:`remove_stale_temporaries`
clears those a killed run left behind. Whole folders (a generated data set, a converted one) are built the same
way by :func:`atomic_folder`, in temporary sibling folders of the same name pattern.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_folder",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_path",
    "is_temporary",
    "remove_stale_temporaries",
]

_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp")


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a temporary file of :func:`atomic_path` (or a folder of the same pattern).

    Args:
        path: a file or folder path.

    Returns:
        True for ``.<name>.<16 hex digits>.tmp...`` names.
    """
    return bool(_TEMPORARY.match(Path(path).name))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's) content to disk.

    Args:
        path: an existing file or folder.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files and folders a killed run left directly in ``folder``.

    Only names :func:`is_temporary` recognises are touched (files of :func:`atomic_path`, folders of
    :func:`atomic_folder`); a folder that does not exist is fine. Call it when a run starts, before it writes:
    a second run writing into the same folder at the same time would lose its temporaries.

    Args:
        folder: the output folder of a run.
        name: only the temporaries of this destination (``.<name>.<hex>.tmp...``, ``name`` without its suffix for
            files); ``None``: all.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if not is_temporary(entry) or (name is not None and not entry.name.startswith(f".{name}.")):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; flush it and rename it onto ``path`` when the block succeeds.

    The temporary file is created with ``os.open(..., 0o666)``, so the result gets the permissions ``open()``
    would give it under the process umask (the umask is never changed or read).

    Args:
        path: final destination. Its parent folder is created if needed.
        suffix: suffix of the temporary file (defaults to the destination's full suffix, so writers that
            choose a format by extension, e.g. ``.nii.gz`` or ``.tif``, still work).

    Yields:
        The temporary path to write to.

    Raises:
        Whatever the block raises; the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    while True:
        tmp = path.parent / f".{path.stem}.{secrets.token_hex(8)}.tmp{suffix}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a truncated file at ``path``.

    Args:
        obj: object to save (prefer plain tensor dicts so ``torch.load(weights_only=True)`` works).
        path: destination file.

    Returns:
        The destination path.
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8).

    Args:
        text: content.
        path: destination file.

    Returns:
        The destination path.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    """Serialise ``obj`` as JSON to ``path`` atomically.

    Args:
        obj: JSON-serialisable object.
        path: destination file.
        indent: indentation of the output.

    Returns:
        The destination path.
    """
    return atomic_write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n", path)


def _temporary_folder(path: Path, suffix: str = "") -> Path:
    """Create and return an empty folder ``.<name>.<16 hex>.tmp<suffix>`` next to ``path``."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp{suffix}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Build a folder in a temporary sibling and rename it onto ``out_dir`` when the block succeeds.

    The sibling is ``.<name>.<16 hex>.tmp``; a replaced ``out_dir`` is first moved into a second sibling
    ``.<name>.<16 hex>.tmp-old`` and deleted after the swap. Both names are recognised by :func:`is_temporary`,
    so a killed run's leftovers are never taken for a result.

    Args:
        out_dir: final folder.
        replaceable: decides whether an existing non-empty ``out_dir`` may be replaced (e.g. it was written by
            the same tool); checked before the block runs.

    Yields:
        The temporary folder to fill.

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty and may not be replaced.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not replaceable(out_dir))):
        raise FileExistsError(f"{out_dir} exists and was not written by this tool; choose an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_folder(out_dir)
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = _temporary_folder(out_dir, "-old")
            os.replace(out_dir, old / "data")
        os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

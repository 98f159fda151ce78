"""Crash-safe file writing shared by every part of the project.

Every checkpoint, image and report the project writes goes through :func:`atomic_path`: the data is
written to a temporary file in the destination folder and renamed over the destination only once it is
complete, so an interrupted run never leaves a half-written file that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_path", "atomic_torch_save", "atomic_write_json", "atomic_write_text"]

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
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

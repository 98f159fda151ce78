"""Microscopy file conventions: grouping one-file-per-channel images into fields, reading a channel, tile offsets.

A *field* is one microscope field of view; each channel is a separate 2D image file (TIFF, PNG). Files are
grouped into fields by folder and by name, using a regular expression on the file stem with named groups
``field`` (optional) and ``channel`` (:data:`DEFAULT_PATTERN` handles ``fly/POS002_dapi.tif`` -> field
``fly/POS002`` and ``human/dna.tif`` -> field ``human``). Used at run time by :mod:`damm.tasks.microscopy` and by
the offline converter ``python -m data_prep.microscopy``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import tifffile
from monai.data.utils import dense_patch_slices

__all__ = ["DEFAULT_PATTERN", "IMAGE_SUFFIXES", "find_fields", "read_channel", "tile_positions"]

DEFAULT_PATTERN = r"^(?:(?P<field>.+)_)?(?P<channel>[^_]+)$"
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def find_fields(root: str | os.PathLike, pattern: str = DEFAULT_PATTERN) -> dict[str, dict[str, Path]]:
    """Group the channel files under ``root`` (recursively) into fields.

    Args:
        root: folder to scan.
        pattern: regex on the file stem with named groups ``channel`` and optionally ``field``.

    Returns:
        ``{field_id: {channel: path}}`` sorted by field id; ``field_id`` is the folder path relative to ``root``
        joined with the ``field`` group when present (files directly in ``root``: the ``field`` group, or the
        root's name).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: bad pattern, a channel given twice in a field, or no image file found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"microscopy folder not found: {root}")
    regex = re.compile(pattern)
    if "channel" not in regex.groupindex:
        raise ValueError(f"pattern {pattern!r} needs a named group 'channel'")
    fields: dict[str, dict[str, Path]] = {}
    unmatched = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or not path.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        stem = path.name[: -len(path.suffix)]
        m = regex.match(stem)
        if m is None:
            unmatched.append(str(path))
            continue
        folder = path.parent.relative_to(root).as_posix()
        field = m.groupdict().get("field")
        if folder == ".":
            field_id = field or root.resolve().name
        else:
            field_id = f"{folder}/{field}" if field else folder
        channel = m.group("channel")
        channels = fields.setdefault(field_id, {})
        if channel in channels:
            raise ValueError(f"field {field_id!r}: channel {channel!r} given twice ({channels[channel]}, {path})")
        channels[channel] = path
    if not fields:
        extra = f" ({len(unmatched)} files did not match {pattern!r})" if unmatched else ""
        raise ValueError(f"{root}: no channel image (.tif/.tiff/.png) found{extra}")
    return dict(sorted(fields.items()))


def tile_positions(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``tile`` every ``stride``, the last one flush with the
    border (MONAI's :func:`~monai.data.utils.dense_patch_slices` along one axis).

    E.g. ``tile_positions(40, 16, 16) == [0, 16, 24]``.

    Args:
        length: image side.
        tile: window side (``1 <= tile <= length``).
        stride: step (>= 1).

    Returns:
        Sorted unique offsets.

    Raises:
        ValueError: ``tile`` or ``stride`` out of range (MONAI would silently shrink a tile larger than the image).
    """
    if not 1 <= int(tile) <= int(length) or int(stride) < 1:
        raise ValueError(f"tile_positions: need 1 <= tile <= length and stride >= 1, got {length=}, {tile=}, {stride=}")
    length, tile, stride = int(length), int(tile), int(stride)
    if stride <= tile:
        slices = dense_patch_slices((length,), (tile,), (stride,))
    else:
        # MONAI 1.6.1 workaround: dense_patch_slices counts windows only up to ceil(length / stride), which with
        # gaps between windows (stride > tile) can find no window reaching the border and then returns the first
        # window alone (e.g. length 512, tile 32, stride 64 -> [0]). Windows of `stride` over
        # `length - tile + stride` have exactly the wanted starts (checked against the direct enumeration).
        slices = dense_patch_slices((length - tile + stride,), (stride,), (stride,))
    return sorted({int(s[0].start) for s in slices})


def read_channel(path: str | os.PathLike) -> np.ndarray:
    """Read one channel image (TIFF via tifffile, all pages; PNG via PIL) as a 2D array (RGB collapsed by max).

    Args:
        path: image file.

    Returns:
        2D array in its stored dtype (numpy row/column order, like :class:`transforms.readers.TiffReader`).

    Raises:
        FileNotFoundError: missing file.
        ValueError: unreadable or not 2D.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"channel image not found: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = np.asarray(tifffile.imread(str(path)))
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as err:
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].max(axis=-1)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2D single-channel image, got shape {arr.shape}")
    return arr

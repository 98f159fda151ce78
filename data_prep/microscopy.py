"""Tile multi-channel fluorescence fields stored one file per channel, with a field-level split.

A *field* is one microscope field of view; each channel is a separate 2D image file (TIFF, PNG). Files are
grouped into fields by folder and by name, using a regular expression on the file stem with named groups
``field`` (optional) and ``channel``. The default ``^(?:(?P<field>.+)_)?(?P<channel>[^_]+)$`` handles both

- ``fly/POS002_dapi.tif, fly/POS002_fitc.tif, fly/POS076_dapi.tif, ...`` -> fields ``fly/POS002``, ``fly/POS076``;
- ``human/dna.tif, human/ph3.tif, human/cellbody.tif`` (one folder = one field) -> field ``human``.

Every field must have every selected channel, all of the same 2D shape. Each field is cut into tiles of
``tile_size`` (stride ``stride``; the last row/column is aligned to the border so the whole field is covered),
written as TIFF (dtype kept) to ``OUT/<key>/<field>_y<row>_x<col>.tif``, and listed in ``OUT/datalist.json``.
Tiles of one field always share a split (neighbouring tiles are correlated), so the split is by field; fields
may also be assigned explicitly (``--val-fields``, ``--test-fields``).

Run ``python -m data_prep.microscopy ROOT --out OUT --tile-size 256 [--channels dapi fitc rhodamine]
[--rename dapi=nuclei] [--test-fields fly/POS076]``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from damm.tasks.microscopy_files import DEFAULT_PATTERN, find_fields, tile_positions
from data_prep._common import add_split_args
from ddcore.atomic import atomic_folder
from ddcore.content import check_finite
from ddcore.datalist import SPLITS, assign_splits, read_datalist, write_datalist
from transforms.checks import check_coregistered, geometry_from_affine

__all__ = ["DEFAULT_PATTERN", "convert", "find_fields", "main", "tile_positions"]

CONVERTER_ID = "data_prep.microscopy"


def _read(path: Path) -> np.ndarray:
    try:
        if path.name.lower().endswith((".tif", ".tiff")):
            arr = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as err:
        raise ValueError(f"unreadable or truncated image file {path}: {type(err).__name__}: {err}") from err
    if arr.size == 0:
        raise ValueError(f"unreadable or truncated image file {path}: no pixel data")
    rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4)
    if arr.ndim != 2 and not rgb:
        raise ValueError(f"{path}: expected a 2D single-channel (or RGB) image, got an array of shape {arr.shape}")
    check_finite(arr, "image", str(path))  # NaN / Inf / complex values
    return arr


def _is_ours(folder: Path) -> bool:
    try:
        return read_datalist(folder / "datalist.json").get("converter") == CONVERTER_ID
    except (OSError, ValueError):
        return False


def convert(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    tile_size: int = 256,
    stride: int | None = None,
    channels: Sequence[str] | None = None,
    rename: Mapping[str, str] | None = None,
    pattern: str = DEFAULT_PATTERN,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    val_fields: Sequence[str] = (),
    test_fields: Sequence[str] = (),
    min_std: float = 0.0,
    split_unit: str = "field",
) -> Path:
    """Tile every field and write tiles plus a datalist (atomically: nothing is left behind on error).

    Args:
        root: folder with the channel files.
        out_dir: output folder (created; replaced only if empty or written by this converter).
        tile_size: tile side in pixels.
        stride: step between tiles (default ``tile_size``: no overlap).
        channels: channels to keep (default: the channels of the first field); every field must have them.
        rename: channel -> datalist key (e.g. ``{"dna": "nuclei"}``); other channels keep their name.
        pattern: file-stem regex (see :func:`find_fields`).
        val_fraction: fraction of fields for validation (random, unless fields are given explicitly).
        test_fraction: fraction of fields for test.
        seed: split seed.
        val_fields: fields forced into validation.
        test_fields: fields forced into test.
        min_std: skip tiles whose first channel has a standard deviation below this (empty background).
        split_unit: ``"field"`` (default: tiles of one field share a split) or ``"tile"`` (tiles are split at
            random, for data with too few fields for three splits; neighbouring tiles are correlated, and overlap
            when ``stride < tile_size``, so validation and test figures are optimistic). A split left empty
            although its fraction is positive is reported with a ``UserWarning`` naming what to pass.

    Returns:
        Path of ``OUT/datalist.json``.

    Raises:
        FileNotFoundError: missing root.
        ValueError: missing channels, shape mismatch within a field, 3D or unreadable images, field smaller than
            the tile, unknown explicit fields, bad sizes.
        FileExistsError: ``out_dir`` holds something else.
    """
    if split_unit not in ("field", "tile"):
        raise ValueError(f"split_unit must be 'field' or 'tile', got {split_unit!r}")
    if split_unit == "tile" and (val_fields or test_fields):
        raise ValueError("--val-fields / --test-fields assign fields; they cannot be combined with --split-unit tile")
    if tile_size < 1 or (stride is not None and stride < 1):
        raise ValueError(f"tile_size and stride must be positive, got {tile_size}, {stride}")
    stride = stride or tile_size
    fields = find_fields(root, pattern)
    channels = list(channels) if channels else sorted(next(iter(fields.values())))
    rename = dict(rename or {})
    unknown_rename = sorted(set(rename) - set(channels))
    if unknown_rename:
        raise ValueError(f"--rename names channels that are not selected: {unknown_rename} (channels {channels})")
    keys = [rename.get(c, c) for c in channels]
    if len(set(keys)) != len(keys):
        raise ValueError(f"datalist keys are not unique after renaming: {keys}")
    problems = [
        f"{f}: missing {sorted(set(channels) - set(ch))}" for f, ch in fields.items() if set(channels) - set(ch)
    ]
    if problems:
        raise ValueError(f"fields lack channels {channels}: " + "; ".join(problems))
    forced = {**dict.fromkeys(val_fields, "validation"), **dict.fromkeys(test_fields, "test")}
    unknown = sorted(set(forced) - set(fields))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; fields are {sorted(fields)}")
    # read and check everything before writing anything
    images: dict[str, dict[str, np.ndarray]] = {}
    for field, files in fields.items():
        arrays = {c: _read(files[c]) for c in channels}
        try:
            check_coregistered(
                {c: geometry_from_affine(a.shape[:2]) for c, a in arrays.items()},
                {c: files[c].name for c in arrays},
                what="channels",
            )
        except ValueError as err:
            raise ValueError(f"field {field!r}: {err}") from err
        h, w = arrays[channels[0]].shape[:2]
        if h < tile_size or w < tile_size:
            raise ValueError(f"field {field!r} ({h}x{w}) is smaller than the tile size {tile_size}")
        images[field] = arrays
    tiles = []  # (field, y, x, tile id)
    for field, arrays in images.items():
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", field)
        h, w = arrays[channels[0]].shape[:2]
        for y in tile_positions(h, tile_size, stride):
            for x in tile_positions(w, tile_size, stride):
                if min_std > 0 and arrays[channels[0]][y : y + tile_size, x : x + tile_size].std() < min_std:
                    continue
                tiles.append((field, y, x, f"{slug}_y{y:05d}_x{x:05d}"))
    if split_unit == "tile":
        split_of_tile = assign_splits([t[3] for t in tiles], val_fraction, test_fraction, seed) if tiles else {}
        split_of = dict.fromkeys(fields, "training")
    else:
        free = [f for f in fields if f not in forced]
        split_of = dict(assign_splits(free, val_fraction, test_fraction, seed)) if free else {}
        split_of.update(forced)
        split_of_tile = {t[3]: split_of[t[0]] for t in tiles}
    _warn_empty_splits(split_of_tile, len(fields), split_unit, {"validation": val_fraction, "test": test_fraction})
    datalist: dict[str, Any] = {
        "name": Path(root).resolve().name,
        "description": "fluorescence tiles cut by data_prep.microscopy (field-level split)",
        "converter": CONVERTER_ID,
        "modalities": keys,
        "channels": dict(zip(keys, channels)),
        "tile_size": tile_size,
        "stride": stride,
        "split_unit": split_unit,
        "fields": {s: sorted({t[0] for t in tiles if split_of_tile[t[3]] == s}) for s in SPLITS},
        "tensorImageSize": "2D",
        **{s: [] for s in SPLITS},
    }
    with atomic_folder(out_dir, _is_ours) as tmp:
        for key in keys:
            (tmp / key).mkdir()
        for field, y, x, tid in tiles:
            arrays = images[field]
            item: dict[str, Any] = {"id": tid}
            for c, key in zip(channels, keys):
                rel = f"{key}/{tid}.tif"
                tifffile.imwrite(tmp / rel, np.ascontiguousarray(arrays[c][y : y + tile_size, x : x + tile_size]))
                item[key] = rel
            item.update({"field": field, "y": y, "x": x})
            datalist[split_of_tile[tid]].append(item)
        write_datalist(datalist, tmp / "datalist.json")
    return Path(out_dir) / "datalist.json"


def _warn_empty_splits(
    split_of_tile: Mapping[str, str], n_fields: int, split_unit: str, fractions: Mapping[str, float]
) -> None:
    empty = [s for s, f in fractions.items() if f > 0 and s not in set(split_of_tile.values())]
    if not empty:
        return
    hint = (
        "pass --split-unit tile for a tile-level split (optimistic: neighbouring tiles are correlated), or "
        "assign fields with --val-fields / --test-fields"
        if split_unit == "field"
        else "use a smaller --tile-size or larger fractions"
    )
    warnings.warn(
        f"the {' and '.join(empty)} split(s) are empty: {n_fields} field(s) and {len(split_of_tile)} tile(s) are "
        f"too few for a {split_unit}-level split with these fractions; {hint}",
        UserWarning,
        stacklevel=3,
    )


def _parse_rename(values: Sequence[str]) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise ValueError(f"--rename expects OLD=NEW, got {v!r}")
        old, new = v.split("=", 1)
        out[old] = new
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m data_prep.microscopy``).

    Args:
        argv: arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.microscopy",
        description="Cut fluorescence fields stored one file per channel (e.g. POS002_dapi.tif or one folder per "
        "field with dna.tif, ph3.tif) into tiles with a field-level training/validation/test split and a MONAI "
        "datalist.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", help="folder with the channel files (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder for tiles and datalist.json")
    parser.add_argument("--tile-size", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--stride", type=int, default=None, help="step between tiles (default: tile size)")
    parser.add_argument(
        "--channels", nargs="+", default=None, help="channels to keep (default: all of the first field)"
    )
    parser.add_argument("--rename", nargs="+", default=[], metavar="OLD=NEW", help="rename channels to datalist keys")
    parser.add_argument("--pattern", default=DEFAULT_PATTERN, help="regex on file stems with groups field, channel")
    parser.add_argument("--val-fields", nargs="+", default=[], help="fields forced into validation")
    parser.add_argument("--test-fields", nargs="+", default=[], help="fields forced into test")
    parser.add_argument("--min-std", type=float, default=0.0, help="skip tiles whose first channel std is below this")
    parser.add_argument(
        "--split-unit",
        choices=["field", "tile"],
        default="field",
        help="split whole fields (default) or single tiles (for too few fields; optimistic figures)",
    )
    add_split_args(parser, "fields")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            path = convert(
                args.root,
                args.out,
                tile_size=args.tile_size,
                stride=args.stride,
                channels=args.channels,
                rename=_parse_rename(args.rename),
                pattern=args.pattern,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                seed=args.seed,
                val_fields=args.val_fields,
                test_fields=args.test_fields,
                min_std=args.min_std,
                split_unit=args.split_unit,
            )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"error: {err}\n")
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    data = read_datalist(path)
    print(f"wrote {path}: " + ", ".join(f"{s}={len(data[s])} tiles ({len(data['fields'][s])} fields)" for s in SPLITS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reading, writing and splitting MONAI-style datalists (the JSON every converter and generator writes).

A datalist is a JSON object following MONAI's decathlon datalist conventions::

    {"name": "...", "modalities": ["np_signal", "vessel", "nuclei"],
     "training": [{"id": "tile_00000", "np_signal": "np/tile_00000.png", ...}, ...],
     "validation": [...], "test": [...]}

Paths inside items are relative to the folder holding the datalist file (or absolute).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddcore.atomic import atomic_write_json

__all__ = ["SPLITS", "assign_splits", "load_datalist", "read_datalist", "relative_to", "write_datalist"]

SPLITS = ("training", "validation", "test")


def read_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Read and structurally validate a datalist JSON file.

    Args:
        path: the datalist file.

    Returns:
        The parsed datalist (a dict).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, not valid JSON, not a JSON object, or a split is not a list of objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"datalist {path} is empty; expected a JSON object with 'training'/'validation'/'test' lists")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist {path} is not valid JSON ({err}); expected a JSON object") from err
    if not isinstance(data, dict):
        raise ValueError(f"datalist {path} must hold a JSON object, got {type(data).__name__}")
    for split in SPLITS:
        if split in data:
            items = data[split]
            if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                raise ValueError(f"datalist {path}: '{split}' must be a list of objects (one per sample)")
    return data


def load_datalist(path: str | os.PathLike, split: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Load one split of a datalist, with absolute, checked paths for ``keys``.

    Args:
        path: the datalist JSON file.
        split: which list to return, e.g. ``"training"``, ``"validation"`` or ``"test"``.
        keys: the modality keys whose values are file paths; each is made absolute (relative paths are
            resolved against the datalist's folder) and must exist. Other fields of each item are kept as-is.

    Returns:
        A list of item dicts (copies), in file order.

    Raises:
        FileNotFoundError: the datalist or a referenced file does not exist (names the item and key).
        ValueError: the datalist is empty or malformed, the split is unknown or empty, or an item lacks a
            requested key (the message lists the modalities the datalist has).
    """
    path = Path(path)
    data = read_datalist(path)
    if isinstance(keys, str):
        keys = [keys]
    if not keys:
        raise ValueError("load_datalist: 'keys' is empty; name at least one modality key")
    lists = [k for k, v in data.items() if isinstance(v, list) and all(isinstance(i, dict) for i in v)]
    if split not in data:
        raise ValueError(f"datalist {path} has no split {split!r}; available: {sorted(lists)}")
    items = data[split]
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"datalist {path}: split {split!r} must be a list of objects")
    if not items:
        raise ValueError(f"datalist {path}: split {split!r} is empty")
    available = data.get("modalities")
    base = path.resolve().parent
    out = []
    for index, item in enumerate(items):
        name = item.get("id", f"#{index}")
        new = dict(item)
        for key in keys:
            if key not in item:
                hint = f"; the datalist's modalities are {available}" if available else ""
                raise ValueError(
                    f"datalist {path}: item {name!r} of split {split!r} has no key {key!r}{hint} "
                    f"(item keys: {sorted(item)})"
                )
            value = item[key]
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"datalist {path}: item {name!r} key {key!r} must be a file path string, got {value!r}"
                )
            file = Path(value).expanduser()
            file = file if file.is_absolute() else base / file
            if not file.exists():
                raise FileNotFoundError(f"datalist {path}: item {name!r} key {key!r}: file not found: {file}")
            new[key] = str(file)
        out.append(new)
    return out


def write_datalist(datalist: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Validate the structure of ``datalist`` and write it atomically as JSON.

    Args:
        datalist: dict with at least one of ``training``/``validation``/``test`` (lists of item dicts).
        path: destination ``.json`` file.

    Returns:
        The destination path.

    Raises:
        ValueError: a split is not a list of dicts, or no split holds any item.
    """
    for split in SPLITS:
        items = datalist.get(split, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError(f"datalist split {split!r} must be a list of dicts")
    if not any(datalist.get(split) for split in SPLITS):
        raise ValueError(f"refusing to write {path}: the datalist has no item in {SPLITS}")
    return atomic_write_json(dict(datalist), path)


def relative_to(file: str | os.PathLike, base: str | os.PathLike) -> str:
    """Path of ``file`` for a datalist in folder ``base``: relative (POSIX) when inside ``base``, else absolute.

    Args:
        file: a file path.
        base: the datalist's folder.

    Returns:
        The path string to store in the datalist.
    """
    file, base = Path(file).resolve(), Path(base).resolve()
    try:
        return file.relative_to(base).as_posix()
    except ValueError:
        return file.as_posix()


def assign_splits(
    ids: Sequence[Hashable],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    strata: Mapping[Hashable, Hashable] | None = None,
) -> dict[Hashable, str]:
    """Randomly assign ids (tiles, fields, subjects, slides) to training/validation/test, stratified.

    Each stratum is split separately with the given fractions (rounded); a stratum with at least 3 members
    puts at least one in every split whose fraction is positive, so e.g. the test split holds both
    consistent and divergent tiles. Training always keeps at least one member of each stratum.

    Args:
        ids: unique identifiers to split.
        val_fraction: fraction for ``validation`` (0 <= f < 1).
        test_fraction: fraction for ``test`` (0 <= f, val + test < 1).
        seed: random seed (deterministic for a seed and the sorted ids).
        strata: optional map id -> stratum label.

    Returns:
        Map id -> split name.

    Raises:
        ValueError: fractions out of range or duplicate ids.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            "split fractions must satisfy 0 <= val, test and val + test < 1; "
            f"got val={val_fraction}, test={test_fraction}"
        )
    if len(set(ids)) != len(ids):
        raise ValueError("assign_splits: ids must be unique")
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[Hashable]] = {}
    for i in ids:
        groups.setdefault(strata[i] if strata is not None else 0, []).append(i)
    out: dict[Hashable, str] = {}
    for label in sorted(groups, key=str):
        members = sorted(groups[label], key=str)
        m = len(members)
        n_test = round(m * test_fraction)
        n_val = round(m * val_fraction)
        if m >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        while n_test + n_val > m - 1 and (n_test or n_val):
            if n_val >= n_test and n_val:
                n_val -= 1
            else:
                n_test -= 1
        order = rng.permutation(m)
        for rank, j in enumerate(order):
            out[members[j]] = "test" if rank < n_test else "validation" if rank < n_test + n_val else "training"
    return out

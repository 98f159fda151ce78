"""The project's one datalist layer: MONAI-style datalists read with checks, written atomically, split by seed.

A datalist is a JSON object following MONAI's decathlon datalist conventions::

    {"name": "...", "modalities": ["np_signal", "vessel", "nuclei"],
     "training": [{"id": "tile_00000", "np_signal": "np/tile_00000.png", ...}, ...],
     "validation": [...], "test": [...]}

Paths inside items are relative to the folder holding the datalist file (or to a given base folder), or absolute.
DAMM (:mod:`damm.data`), the BraTS and microscopy tasks and DRDM's workflows all read datalists through
:func:`load_datalist` (DRDM's image/label lists through :func:`load_volume_datalist`, the same loader with
``image`` required and ``label`` optional); the offline converters of ``data_prep`` write them through
:func:`write_datalist` and split ids with :func:`assign_splits`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist, partition_dataset

from ddcore.atomic import atomic_write_json

__all__ = [
    "SPLITS",
    "assign_splits",
    "load_datalist",
    "load_volume_datalist",
    "read_datalist",
    "relative_to",
    "write_datalist",
]

SPLITS = ("training", "validation", "test")

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


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
        raise FileNotFoundError(f"datalist not found: {path} (write one with a converter: python -m data_prep.<tool>)")
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


def _path_values(value: Any) -> list[str] | None:
    """The path strings of a datalist value (a string or a list of strings, as MONAI's loader accepts)."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    return None


def load_datalist(
    path: str | os.PathLike,
    split: str,
    keys: Sequence[str] | str,
    optional_keys: Sequence[str] = (),
    base_dir: str | os.PathLike | None = None,
    allow_empty: bool = False,
) -> list[dict[str, Any]]:
    """Load one split of a datalist, with absolute, checked paths for ``keys`` (MONAI's loader plus checks).

    The file is first validated by :func:`read_datalist`; the items then come from
    :func:`monai.data.load_decathlon_datalist`, which joins the paths to ``base_dir``. MONAI also joins *any*
    other string field that happens to name an existing file (e.g. an ``id`` equal to a file name); those fields
    are restored to their values in the file, so only ``keys`` and ``optional_keys`` are ever rewritten.

    Args:
        path: the datalist JSON file.
        split: which list to return, e.g. ``"training"``, ``"validation"`` or ``"test"``.
        keys: the keys whose values are file paths (a string or a list of strings) that every item must have;
            each is made absolute and must exist.
        optional_keys: path keys that items may lack; when present they are resolved and checked like ``keys``.
        base_dir: folder relative paths are resolved against (default: the datalist's folder).
        allow_empty: return ``[]`` for an empty split instead of raising.

    Returns:
        A list of item dicts (copies), in file order; fields other than the path keys are kept as-is.

    Raises:
        FileNotFoundError: the datalist or a referenced file does not exist (names the datalist, split, item, key).
        ValueError: the datalist is empty or malformed, the split is unknown or empty, or an item lacks a
            requested key or holds a non-path value for it (the message lists the modalities the datalist has).
    """
    path = Path(path)
    data = read_datalist(path)
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError(f"load_datalist({path}): 'keys' is empty; name at least one modality key")
    optional = [k for k in optional_keys if k not in keys]
    lists = [k for k, v in data.items() if isinstance(v, list) and all(isinstance(i, dict) for i in v)]
    if split not in data:
        raise ValueError(f"datalist {path} has no split {split!r}; available: {sorted(lists)}")
    raw = data[split]
    if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
        raise ValueError(f"datalist {path}: split {split!r} must be a list of objects")
    if not raw:
        if allow_empty:
            return []
        raise ValueError(f"datalist {path}: split {split!r} is empty")
    available = data.get("modalities")
    for index, item in enumerate(raw):
        name = item.get("id", f"#{index}")
        for key in (*keys, *(k for k in optional if k in item)):
            if key not in item:
                hint = f"; the datalist's modalities are {available}" if available else ""
                raise ValueError(
                    f"datalist {path}: item {name!r} of split {split!r} has no key {key!r}{hint} "
                    f"(item keys: {sorted(item)})"
                )
            if _path_values(item[key]) is None:
                raise ValueError(
                    f"datalist {path}: item {name!r} of split {split!r} key {key!r} must be a file path string "
                    f"(or a list of them), got {item[key]!r}"
                )
    base = Path(base_dir).resolve() if base_dir is not None else path.resolve().parent
    # MONAI resolves "image"/"label" unconditionally and other strings only when they exist; the checks above
    # already guarantee that the path keys hold path strings, so its output is used for those keys only.
    resolved = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=split, base_dir=str(base))
    out = []
    for index, (item, monai_item) in enumerate(zip(raw, resolved)):
        name = item.get("id", f"#{index}")
        new = dict(item)
        for key in (*keys, *(k for k in optional if k in item)):
            # MONAI leaves a relative path that does not exist as it is (for keys other than image/label)
            files = [f if Path(f).is_absolute() else os.path.normpath(base / f) for f in _path_values(monai_item[key])]
            for file in files:
                if not Path(file).exists():
                    raise FileNotFoundError(
                        f"datalist {path}: split {split!r} item {name!r} key {key!r}: file not found: {file}"
                    )
            new[key] = files[0] if isinstance(item[key], str) else files
        out.append(new)
    return out


def _volume_stem(path: str) -> str:
    name = Path(path).name
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def load_volume_datalist(
    path: str | os.PathLike, split: str = "training", base_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Items of a volume datalist (DRDM): :func:`load_datalist` with ``image`` required and ``label`` optional.

    An empty split gives ``[]``; an item without ``id`` gets its image's file stem (``case.nii.gz`` -> ``case``).

    Args:
        path: datalist JSON (written by ``python -m data_prep.volumes``).
        split: list key.
        base_dir: folder relative paths are resolved against (default: the datalist's folder).

    Returns:
        Items (copies), each with an ``id`` and absolute, existing ``image`` (and ``label``) paths.

    Raises:
        FileNotFoundError: missing datalist or a listed file.
        ValueError: malformed datalist, unknown split or an item without ``image``.
    """
    items = load_datalist(path, split, ["image"], optional_keys=["label"], base_dir=base_dir, allow_empty=True)
    for item in items:
        image = item["image"] if isinstance(item["image"], str) else item["image"][0]
        item.setdefault("id", _volume_stem(image))
    return items


def write_datalist(datalist: Mapping[str, Any], path: str | os.PathLike, keep_field: str | None = None) -> Path:
    """Validate the structure of ``datalist`` and write it atomically as JSON.

    Args:
        datalist: dict with at least one of ``training``/``validation``/``test`` (lists of item dicts).
        path: destination ``.json`` file.
        keep_field: another list field that also counts as content (e.g. ``"incomplete"``: a BraTS datalist of
            subjects that all lack a modality, the input of imputation).

    Returns:
        The destination path.

    Raises:
        ValueError: a split is not a list of dicts, or no split holds any item.
    """
    for split in SPLITS:
        items = datalist.get(split, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError(f"datalist split {split!r} must be a list of dicts")
    if not any(datalist.get(split) for split in SPLITS) and not (keep_field and datalist.get(keep_field)):
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


def _split_counts(m: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(test, validation, training) counts of one stratum of ``m`` members (see :func:`assign_splits`)."""
    n_test, n_val = round(m * test_fraction), round(m * val_fraction)
    if m >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
    while n_test + n_val > m - 1 and (n_test or n_val):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val, m - n_test - n_val


def assign_splits(
    ids: Sequence[Hashable],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    strata: Mapping[Hashable, Hashable] | None = None,
) -> dict[Hashable, str]:
    """Randomly assign ids (tiles, fields, subjects, slides) to training/validation/test, stratified.

    Each stratum (all ids when ``strata`` is None) is split separately with the given fractions (rounded);
    a stratum with at least 3 members puts at least one in every split whose fraction is positive, so e.g. the
    test split holds both consistent and divergent tiles. Training always keeps at least one member of each
    stratum, and every id is assigned.

    The shuffle and the cut are :func:`monai.data.partition_dataset` (``shuffle=True, seed=seed``) on each
    stratum's sorted members, with the per-split counts given as ratios. ``partition_dataset_classes`` is not used
    directly because its per-class rounding (``int(r / sum * n + 0.5)`` for each split) can leave ids in no split
    and guarantees no member of a small stratum in the test split.

    Args:
        ids: unique identifiers to split.
        val_fraction: fraction for ``validation`` (0 <= f < 1).
        test_fraction: fraction for ``test`` (0 <= f, val + test < 1).
        seed: random seed (deterministic for a seed and the set of ids, whatever their order).
        strata: optional map id -> stratum label.

    Returns:
        Map id -> split name.

    Raises:
        ValueError: fractions out of range, duplicate ids, or an id without a stratum.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            "split fractions must satisfy 0 <= val, test and val + test < 1; "
            f"got val={val_fraction}, test={test_fraction}"
        )
    if len(set(ids)) != len(ids):
        raise ValueError("assign_splits: ids must be unique")
    if strata is not None and (missing := [i for i in ids if i not in strata]):
        raise ValueError(f"assign_splits: ids without a stratum: {missing[:5]}")
    groups: dict[Hashable, list[Hashable]] = {}
    for i in ids:
        groups.setdefault(strata[i] if strata is not None else 0, []).append(i)
    out: dict[Hashable, str] = {}
    for label in sorted(groups, key=str):
        members = sorted(groups[label], key=str)
        counts = _split_counts(len(members), val_fraction, test_fraction)
        # integer ratios summing to len(members): partition_dataset's rounding then reproduces them exactly
        parts = partition_dataset(members, ratios=list(counts), shuffle=True, seed=seed)
        for name, part in zip(("test", "validation", "training"), parts):
            out.update(dict.fromkeys(part, name))
    return out

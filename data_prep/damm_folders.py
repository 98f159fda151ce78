"""Convert a folder of paired NP / vessel / nuclei images to a MONAI datalist.

Two layouts are accepted (the folder names decide):

- ``official``: the DAMM-Diffusion release layout ``ROOT/QD/``, ``ROOT/CD31/``, ``ROOT/DAPI/`` (RGB JPEGs with the
  same file names; ``QD`` is the nanoparticle target). Keys: ``QD -> np_signal``, ``CD31 -> vessel``,
  ``DAPI -> nuclei``.
- ``ours``: ``ROOT/np/``, ``ROOT/vessel/``, ``ROOT/nuclei/`` (what :mod:`data_prep.synthetic_np` writes).

Images are paired by file stem; a stem present in one folder and missing from another is an error listing them.
The split is random by image, or by group when ``--group-regex`` extracts a group (e.g. the slide) from the name:
``--group-regex '^(IMG\\d+)_'`` keeps all patches of a slide in one split (recommended: neighbouring patches of
one slide are strongly correlated).

Run ``python -m data_prep.damm_folders ROOT [--datalist OUT.json] [--layout auto|official|ours]``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep._common import add_split_args, check_image_files, check_same_shapes, default_datalist_path, image_files
from ddcore.datalist import SPLITS, assign_splits, relative_to, write_datalist

__all__ = ["LAYOUTS", "MODALITIES", "convert", "detect_layout", "main"]

MODALITIES = ("np_signal", "vessel", "nuclei")
LAYOUTS: dict[str, dict[str, str]] = {
    "official": {"np_signal": "QD", "vessel": "CD31", "nuclei": "DAPI"},
    "ours": {"np_signal": "np", "vessel": "vessel", "nuclei": "nuclei"},
}


def detect_layout(root: str | os.PathLike) -> str:
    """Which layout ``root`` uses.

    Args:
        root: dataset folder.

    Returns:
        ``"official"`` or ``"ours"``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: neither or both layouts are present, or a layout is incomplete (names the missing folders).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    present = {name: [f for f in folders.values() if (root / f).is_dir()] for name, folders in LAYOUTS.items()}
    full = [name for name, found in present.items() if len(found) == len(LAYOUTS[name])]
    if len(full) == 1:
        return full[0]
    if len(full) > 1:
        raise ValueError(f"{root} holds both layouts ({LAYOUTS}); pass layout='official' or 'ours'")
    partial = {name: found for name, found in present.items() if found}
    if partial:
        name = max(partial, key=lambda n: len(partial[n]))
        missing = [f for f in LAYOUTS[name].values() if f not in partial[name]]
        raise ValueError(f"{root}: incomplete {name!r} layout, missing folder(s) {missing}")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise ValueError(
        f"{root}: no known layout; expected sub-folders {list(LAYOUTS['official'].values())} (official) or "
        f"{list(LAYOUTS['ours'].values())} (ours), found {subdirs}"
    )


def _by_stem(folder: Path) -> dict[str, Path]:
    files = image_files(folder)
    out: dict[str, Path] = {}
    for name, path in files.items():
        stem = path.stem
        if stem in out:
            raise ValueError(f"{folder}: two images share the name {stem!r} ({out[stem].name}, {name})")
        out[stem] = path
    return out


def convert(
    root: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    layout: str = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    group_regex: str | None = None,
    check: str = "header",
) -> Path:
    """Pair the images of a DAMM-style folder and write a datalist with training/validation/test splits.

    Everything is checked before the datalist is written (atomically); on error nothing is written.

    Args:
        root: dataset folder (``QD/ CD31/ DAPI/`` or ``np/ vessel/ nuclei/``).
        datalist: output JSON (default ``ROOT/datalist.json``); item paths are relative to its folder.
        layout: ``"auto"``, ``"official"`` or ``"ours"``.
        val_fraction: validation fraction (of images or groups).
        test_fraction: test fraction (of images or groups).
        seed: split seed.
        group_regex: regular expression applied to the file stem; its first group (or whole match) is the split
            unit. Every stem must match.
        check: image check before writing: ``"none"``, ``"header"`` (readable, real, the channels of each item of
            one size) or ``"full"`` (also decode every pixel: finite, real values).

    Returns:
        The datalist path.

    Raises:
        FileNotFoundError: missing root.
        ValueError: unknown/incomplete layout, unpaired or duplicated names (all listed), empty folders,
            unreadable images, bad content, channels of different sizes, a stem not matching ``group_regex``.
    """
    root = Path(root)
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {sorted(LAYOUTS)}, got {layout!r}")
    folders = LAYOUTS[layout]
    for folder in folders.values():
        if not (root / folder).is_dir():
            raise ValueError(f"{root}: missing folder {folder!r} of the {layout!r} layout")
    files = {key: _by_stem(root / folder) for key, folder in folders.items()}
    empty = [folders[k] for k, v in files.items() if not v]
    if empty:
        raise ValueError(f"{root}: no images in folder(s) {empty}")
    stems = set().union(*(set(v) for v in files.values()))
    problems = []
    for key, found in files.items():
        missing = sorted(stems - set(found))
        if missing:
            shown = ", ".join(missing[:20]) + (f" ... (+{len(missing) - 20} more)" if len(missing) > 20 else "")
            problems.append(f"{folders[key]}/ lacks {len(missing)} image(s) present elsewhere: {shown}")
    if problems:
        raise ValueError(f"{root}: image names do not match across folders: " + "; ".join(problems))
    stems_sorted = sorted(stems)
    shapes = check_image_files([files[k][s] for s in stems_sorted for k in folders], level=check)
    check_same_shapes({s: {folders[k]: files[k][s] for k in folders} for s in stems_sorted}, shapes)
    if group_regex:
        pattern = re.compile(group_regex)
        groups = {}
        for s in stems_sorted:
            m = pattern.search(s)
            if m is None:
                raise ValueError(f"image {s!r} does not match --group-regex {group_regex!r}")
            groups[s] = m.group(1) if m.groups() else m.group(0)
    else:
        groups = {s: s for s in stems_sorted}
    split_of_group = assign_splits(sorted(set(groups.values())), val_fraction, test_fraction, seed)
    out_path = default_datalist_path(root, datalist)
    base = out_path.resolve().parent
    data: dict[str, Any] = {
        "name": root.resolve().name,
        "description": f"paired NP images converted from the {layout!r} DAMM layout by data_prep.damm_folders",
        "layout": layout,
        "folders": dict(folders),
        "modalities": list(MODALITIES),
        "target": "np_signal",
        "conditions": ["vessel", "nuclei"],
        "split_unit": "group" if group_regex else "image",
        "group_regex": group_regex,
        **{s: [] for s in SPLITS},
    }
    for s in stems_sorted:
        item: dict[str, Any] = {"id": s}
        for key in MODALITIES:
            item[key] = relative_to(files[key][s], base)
        item["group"] = groups[s]
        data[split_of_group[groups[s]]].append(item)
    return write_datalist(data, out_path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m data_prep.damm_folders``).

    Args:
        argv: arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.damm_folders",
        description="Pair NP/vessel/nuclei images of a DAMM-style folder (QD/ CD31/ DAPI/ or np/ vessel/ nuclei/, "
        "same file names in each) and write a MONAI datalist (training/validation/test).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", help="dataset folder")
    parser.add_argument("--datalist", default=None, help="output JSON (default ROOT/datalist.json)")
    parser.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="folder layout")
    parser.add_argument(
        "--group-regex",
        default=None,
        help="regex on the file stem whose first group is the split unit, e.g. '^(IMG\\d+)_' for slide-level splits",
    )
    parser.add_argument(
        "--check", default="header", choices=["none", "header", "full"], help="how thoroughly to check images first"
    )
    add_split_args(parser, "images (or groups)")
    args = parser.parse_args(argv)
    try:
        path = convert(
            args.root,
            args.datalist,
            args.layout,
            args.val_fraction,
            args.test_fraction,
            args.seed,
            args.group_regex,
            args.check,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a MONAI datalist of NIfTI volumes (with optional label maps) for the DRDM bundle configs.

Usage::

    python -m data_prep.volumes --images IMG_DIR_OR_FILES... [--labels LAB_DIR_OR_FILES...] --out datalist.json

Images come from a folder (every ``*.nii`` / ``*.nii.gz``) or a list of files; labels from a folder (matched by
file name, optionally after removing ``--label-suffix`` such as ``_seg``) or a list in the same order. The
datalist is ``{"name", "modalities": ["image"], "training": [{"id", "image", "label"?}, ...], ...}`` with paths
relative to the datalist's folder, written atomically. The runtime reads it with
:func:`ddcore.datalist.load_volume_datalist`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib

from ddcore.atomic import atomic_write_json

__all__ = ["build_volume_datalist", "find_volumes", "main"]

_SUFFIXES = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def find_volumes(source: str | os.PathLike | Sequence[str | os.PathLike], name: str = "images") -> list[Path]:
    """NIfTI files of a folder (sorted) or an explicit list of files.

    Args:
        source: folder, single file, or list of files.
        name: what is listed (used in messages).

    Returns:
        Absolute paths.

    Raises:
        FileNotFoundError: a missing folder/file, or a folder without NIfTI files.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_SUFFIXES))
            if not files:
                raise FileNotFoundError(f"{name}: no .nii/.nii.gz files in {path}")
            return [p.resolve() for p in files]
        source = [path]
    files = [Path(p) for p in source]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"{name}: file not found: {p}")
    return [p.resolve() for p in files]


def build_volume_datalist(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    labels: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    label_suffix: str = "",
    validation: int = 0,
    name: str = "volumes",
    check_shapes: bool = True,
) -> Path:
    """Write a datalist of images (and label maps) for the DRDM configs.

    Args:
        images: folder or files of images.
        out: datalist JSON to write.
        labels: folder (matched by name, ``<image stem><label_suffix>.nii[.gz]``) or files in image order.
        label_suffix: suffix of label file stems in a label folder (e.g. ``"_seg"``).
        validation: number of items (from the end) moved to ``"validation"``.
        name: datalist name.
        check_shapes: read headers and check that each label has its image's shape.

    Returns:
        The datalist path.

    Raises:
        FileNotFoundError: missing files, or an image without a matching label in a label folder.
        ValueError: label count or shape mismatch.
    """
    out = Path(out).resolve()
    image_files = find_volumes(images, "images")
    label_files: list[Path | None] = [None] * len(image_files)
    if labels is not None:
        if isinstance(labels, (str, os.PathLike)) and Path(labels).is_dir():
            folder = Path(labels)
            available = {_stem(p): p for p in find_volumes(folder, "labels")}
            for i, img in enumerate(image_files):
                key = _stem(img) + label_suffix
                if key not in available:
                    raise FileNotFoundError(f"labels: no label {key}.nii[.gz] in {folder} for image {img}")
                label_files[i] = available[key].resolve()
        else:
            found = find_volumes(labels, "labels")
            if len(found) != len(image_files):
                raise ValueError(f"labels: got {len(found)} label files for {len(image_files)} images.")
            label_files = list(found)
    items = []
    for img, lab in zip(image_files, label_files):
        item = {"id": _stem(img), "image": os.path.relpath(img, out.parent)}
        if lab is not None:
            if check_shapes:
                shape_i, shape_l = nib.load(str(img)).shape, nib.load(str(lab)).shape
                if shape_i != shape_l:
                    raise ValueError(f"label {lab} has shape {shape_l}, image {img} has {shape_i}.")
            item["label"] = os.path.relpath(lab, out.parent)
        items.append(item)
    if not 0 <= validation < max(len(items), 1):
        raise ValueError(f"validation must be in [0, {len(items) - 1}], got {validation}.")
    split = len(items) - validation
    data = {
        "name": name,
        "modalities": ["image"],
        "labels": labels is not None,
        "training": items[:split],
        "validation": items[split:],
    }
    atomic_write_json(data, out)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", required=True, help="image folder or files")
    parser.add_argument("--labels", nargs="+", default=None, help="label folder or files (same order)")
    parser.add_argument("--label-suffix", default="", help="label stem suffix inside a label folder, e.g. _seg")
    parser.add_argument("--validation", type=int, default=0, help="items moved to the validation split")
    parser.add_argument("--name", default="volumes")
    parser.add_argument("--out", required=True, help="datalist JSON to write")
    args = parser.parse_args(argv)
    images = args.images[0] if len(args.images) == 1 else args.images
    labels = None if args.labels is None else (args.labels[0] if len(args.labels) == 1 else args.labels)
    path = build_volume_datalist(images, args.out, labels, args.label_suffix, args.validation, args.name)
    print(path)
    return path


if __name__ == "__main__":
    main()

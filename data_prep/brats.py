"""Convert a folder of BraTS-style subjects (3D NIfTI MRI) to a MONAI datalist with a subject-level split.

Accepted naming schemes (detected per subject):

==============  ======================================  ==========================================
scheme          example files                           canonical keys
==============  ======================================  ==========================================
``brats2021``   ``BraTS2021_00000_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair``, ``_seg``     t1, t1c, t2, flair, seg
``brats2023``   ``BraTS-GLI-00000-000-t1n.nii.gz``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg``  t1, t1c, t2, flair, seg
``plain``       ``t1.nii.gz``, ``t1c``, ``t2``, ``flair``, ``seg`` (one folder per subject)  same
==============  ======================================  ==========================================

Subjects are the sub-folders of the root (BraTS 2021/2023 files may also lie flat in the root; they are then
grouped by their prefix). A subject lacking one of t1/t1c/t2/flair is not dropped silently: it is listed under
``"incomplete"`` with what it has, what it lacks and the file names the missing modalities would have in its
scheme (see :func:`modality_filename`), as a candidate for imputation. ``seg`` is optional.

Run ``python -m data_prep.brats ROOT [--datalist OUT.json] [--val-fraction 0.1 --test-fraction 0.1 --seed 0]``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from data_prep._common import add_split_args, default_datalist_path
from data_prep.datalist import SPLITS, assign_splits, relative_to, write_datalist

__all__ = [
    "LABEL_KEY",
    "MODALITIES",
    "SCHEMES",
    "convert",
    "detect_scheme",
    "find_subjects",
    "main",
    "modality_filename",
]

MODALITIES = ("t1", "t1c", "t2", "flair")
LABEL_KEY = "seg"
_NII = r"\.nii(?:\.gz)?$"

#: scheme -> (file name regex with groups ``subject`` (optional) and ``tag``, canonical key -> tag, template)
SCHEMES: dict[str, dict[str, Any]] = {
    "brats2021": {
        "regex": re.compile(r"^(?P<subject>.+)_(?P<tag>t1|t1ce|t2|flair|seg)" + _NII, re.IGNORECASE),
        "tags": {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
        "template": "{subject}_{tag}",
    },
    "brats2023": {
        "regex": re.compile(r"^(?P<subject>.+)-(?P<tag>t1n|t1c|t2w|t2f|seg)" + _NII, re.IGNORECASE),
        "tags": {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
        "template": "{subject}-{tag}",
    },
    "plain": {
        "regex": re.compile(r"^(?P<tag>t1|t1c|t2|flair|seg)" + _NII, re.IGNORECASE),
        "tags": {"t1": "t1", "t1c": "t1c", "t2": "t2", "flair": "flair", "seg": "seg"},
        "template": "{tag}",
    },
}


def modality_filename(scheme: str, modality: str, subject: str = "", ext: str = ".nii.gz") -> str:
    """File name of a canonical modality in a naming scheme (e.g. to write a synthesised missing modality).

    Args:
        scheme: ``"brats2021"``, ``"brats2023"`` or ``"plain"``.
        modality: canonical key: ``"t1"``, ``"t1c"``, ``"t2"``, ``"flair"`` or ``"seg"``.
        subject: the subject's file prefix (required for brats2021/brats2023, e.g. ``"BraTS2021_00000"``).
        ext: file extension.

    Returns:
        The file name, e.g. ``modality_filename("brats2023", "flair", "BraTS-GLI-00000-000")`` ->
        ``"BraTS-GLI-00000-000-t2f.nii.gz"``.

    Raises:
        ValueError: unknown scheme or modality, or a missing subject prefix.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown naming scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    tags = SCHEMES[scheme]["tags"]
    if modality not in tags:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(tags)}")
    if "{subject}" in SCHEMES[scheme]["template"] and not subject:
        raise ValueError(f"scheme {scheme!r} needs the subject's file prefix")
    return SCHEMES[scheme]["template"].format(subject=subject, tag=tags[modality]) + ext


def _classify(name: str) -> tuple[str, str, str] | None:
    """(scheme, canonical key, subject prefix) of a file name, or None."""
    for scheme, spec in SCHEMES.items():
        m = spec["regex"].match(name)
        if m:
            tag = m.group("tag").lower()
            key = next(k for k, t in spec["tags"].items() if t == tag)
            return scheme, key, m.groupdict().get("subject") or ""
    return None


def detect_scheme(files: Sequence[str | os.PathLike]) -> str:
    """The naming scheme shared by a subject's files.

    Args:
        files: file names or paths of one subject.

    Returns:
        The scheme name.

    Raises:
        ValueError: no file matches a scheme, or files mix schemes.
    """
    found = {c[0] for f in files if (c := _classify(Path(f).name))}
    if len(found) != 1:
        names = sorted(Path(f).name for f in files)
        what = "no BraTS-style file" if not found else f"mixed naming schemes {sorted(found)}"
        raise ValueError(f"{what} among {names}")
    return found.pop()


def find_subjects(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Discover subjects and their modality files.

    Args:
        root: dataset folder.

    Returns:
        ``{subject: {"scheme", "file_prefix", "folder", "files": {key: Path}}}``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: mixed schemes or prefixes in a subject, a modality given twice, or no subject at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BraTS folder not found: {root}")
    groups: dict[str, tuple[Path, list[Path]]] = {}
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            files = [f for f in sorted(p.iterdir()) if f.is_file() and _classify(f.name)]
            if files:
                groups[p.name] = (p, files)
        elif p.is_file() and (c := _classify(p.name)) and c[0] != "plain":
            groups.setdefault(c[2], (root, []))[1].append(p)
    if not groups:
        raise ValueError(
            f"{root}: no BraTS subject found; expected sub-folders with t1/t1c/t2/flair[/seg] NIfTI files named "
            "like BraTS2021 (*_t1, *_t1ce, *_t2, *_flair, *_seg), BraTS2023 (*-t1n, *-t1c, *-t2w, *-t2f, *-seg) "
            "or plain (t1.nii.gz, ...)"
        )
    subjects: dict[str, dict[str, Any]] = {}
    for subject, (folder, files) in groups.items():
        try:
            scheme = detect_scheme(files)
        except ValueError as err:
            raise ValueError(f"subject {subject!r} ({folder}): {err}") from err
        prefixes = {_classify(f.name)[2] for f in files}
        if len(prefixes) > 1:
            raise ValueError(
                f"subject {subject!r} ({folder}): files with different subject prefixes {sorted(prefixes)}"
            )
        found: dict[str, Path] = {}
        for f in files:
            key = _classify(f.name)[1]
            if key in found:
                raise ValueError(f"subject {subject!r}: modality {key!r} given twice ({found[key].name}, {f.name})")
            found[key] = f
        subjects[subject] = {"scheme": scheme, "file_prefix": prefixes.pop(), "folder": folder, "files": found}
    return subjects


def _check_headers(subject: str, files: dict[str, Path], tol: float) -> None:
    """Read NIfTI headers; raise if unreadable, not 3D, or not on one grid."""
    geo = {}
    for key, f in files.items():
        try:
            img = nib.load(str(f))
            shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
        except Exception as err:
            raise ValueError(f"subject {subject!r}: cannot read {key!r} file {f}: {type(err).__name__}: {err}") from err
        if len(shape) != 3:
            raise ValueError(f"subject {subject!r}: {key!r} file {f} is {len(shape)}D {shape}; expected a 3D volume")
        geo[key] = (shape, np.linalg.norm(affine[:3, :3], axis=0), affine)
    ref = next(iter(geo))
    bad = [
        k
        for k, (shape, spacing, aff) in geo.items()
        if shape != geo[ref][0]
        or not np.allclose(spacing, geo[ref][1], atol=tol)
        or not np.allclose(aff[:3, :3] / spacing, geo[ref][2][:3, :3] / geo[ref][1], atol=tol)
    ]
    if bad:
        desc = "; ".join(
            f"{k}: {files[k].name} shape={geo[k][0]} spacing={np.round(geo[k][1], 4).tolist()}" for k in geo
        )
        raise ValueError(f"subject {subject!r}: modalities {bad} are not on the grid of {ref!r}: {desc}")


def convert(
    root: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    check_headers: bool = True,
    tolerance: float = 1e-3,
) -> Path:
    """Write a datalist for a BraTS-style folder with a subject-level split.

    Args:
        root: dataset folder.
        datalist: output JSON (default ``ROOT/datalist.json``).
        val_fraction: fraction of complete subjects for validation.
        test_fraction: fraction of complete subjects for test.
        seed: split seed.
        check_headers: read every NIfTI header first: unreadable files, non-3D volumes and modalities not on one
            grid (shape, spacing, orientation within ``tolerance``) are errors naming subject and files.
        tolerance: tolerance for the grid check.

    Returns:
        The datalist path.

    Raises:
        FileNotFoundError: missing root.
        ValueError: no subject, no complete subject, inconsistent naming, failed header checks.
    """
    root = Path(root)
    subjects = find_subjects(root)
    if check_headers:
        for subject, info in subjects.items():
            _check_headers(subject, info["files"], tolerance)
    complete = sorted(s for s, i in subjects.items() if all(m in i["files"] for m in MODALITIES))
    if not complete:
        raise ValueError(f"{root}: no subject has all of {list(MODALITIES)}; found {sorted(subjects)}")
    out_path = default_datalist_path(root, datalist)
    base = out_path.resolve().parent
    split_of = assign_splits(complete, val_fraction, test_fraction, seed)
    with_seg = [s for s in complete if LABEL_KEY in subjects[s]["files"]]
    data: dict[str, Any] = {
        "name": root.resolve().name,
        "description": "BraTS-style MRI subjects converted by data_prep.brats (subject-level split)",
        "modalities": list(MODALITIES),
        "labels": [LABEL_KEY] if len(with_seg) == len(complete) else [],
        "tensorImageSize": "3D",
        "split_unit": "subject",
        **{s: [] for s in SPLITS},
        "incomplete": [],
    }
    for subject in complete:
        info = subjects[subject]
        item: dict[str, Any] = {"id": subject, "subject": subject}
        for key in (*MODALITIES, LABEL_KEY):
            if key in info["files"]:
                item[key] = relative_to(info["files"][key], base)
        item.update({"scheme": info["scheme"], "file_prefix": info["file_prefix"]})
        data[split_of[subject]].append(item)
    for subject in sorted(set(subjects) - set(complete)):
        info = subjects[subject]
        missing = [m for m in MODALITIES if m not in info["files"]]
        data["incomplete"].append(
            {
                "subject": subject,
                "missing": missing,
                "present": {k: relative_to(p, base) for k, p in info["files"].items()},
                "scheme": info["scheme"],
                "file_prefix": info["file_prefix"],
                "folder": relative_to(info["folder"], base),
                "expected_files": {m: modality_filename(info["scheme"], m, info["file_prefix"]) for m in missing},
            }
        )
    return write_datalist(data, out_path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m data_prep.brats``).

    Args:
        argv: arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.brats",
        description="Write a MONAI datalist for a folder of BraTS subjects (BraTS 2021 *_t1/_t1ce/_t2/_flair/_seg, "
        "BraTS 2023 *-t1n/-t1c/-t2w/-t2f/-seg, or plain t1/t1c/t2/flair/seg.nii.gz per subject folder), with a "
        "subject-level split. Subjects missing a modality are listed under 'incomplete'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", help="folder holding one sub-folder per subject")
    parser.add_argument("--datalist", default=None, help="output JSON (default ROOT/datalist.json)")
    parser.add_argument("--no-header-check", action="store_true", help="skip reading NIfTI headers")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="spacing/orientation tolerance (mm)")
    add_split_args(parser, "subjects")
    args = parser.parse_args(argv)
    try:
        path = convert(
            args.root,
            args.datalist,
            args.val_fraction,
            args.test_fraction,
            args.seed,
            not args.no_header_check,
            args.tolerance,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert a folder of BraTS-style subjects (3D NIfTI MRI) to a MONAI datalist with a subject-level split.

Accepted naming schemes (detected per subject; the conventions live in :mod:`damm.tasks.brats_files`, shared with
the run-time task):

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
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from damm.tasks.brats_files import (
    LABEL_KEY,
    MODALITIES,
    SCHEMES,
    check_subject_files,
    detect_scheme,
    find_subjects,
    modality_filename,
)
from data_prep._common import add_split_args, default_datalist_path
from ddcore.content import check_finite, check_integer_labels, check_real_file
from ddcore.datalist import SPLITS, assign_splits, relative_to, write_datalist

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


CHECK_LEVELS = ("none", "header", "full")


def _check_headers(subject: str, files: dict[str, Path], tol: float, level: str = "header") -> None:
    """Read NIfTI headers (and at ``"full"`` every voxel); raise naming the subject and the file.

    Header: unreadable, not 3D, complex dtype, not on one grid (origins are not compared). Full: also truncated
    data, NaN / Inf voxels, and a segmentation that is not an integer label map.
    """
    try:
        check_subject_files(files, tol, check_origin=False)
        for key, path in files.items():
            check_real_file(path, f"modality {key!r}")
        if level == "full":
            for key, path in files.items():
                try:
                    data = np.asanyarray(nib.load(str(path)).dataobj)
                except Exception as err:
                    raise ValueError(
                        f"cannot read the voxels of {key!r} file {path} (truncated or corrupt): "
                        f"{type(err).__name__}: {err}"
                    ) from err
                if key == LABEL_KEY:
                    check_integer_labels(data, f"label {key!r}", str(path))
                else:
                    check_finite(data, f"modality {key!r}", str(path))
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"subject {subject!r}: {err}") from err


def convert(
    root: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    check_headers: bool = True,
    tolerance: float = 1e-3,
    check: str = "full",
) -> Path:
    """Write a datalist for a BraTS-style folder with a subject-level split.

    Args:
        root: dataset folder.
        datalist: output JSON (default ``ROOT/datalist.json``).
        val_fraction: fraction of complete subjects for validation.
        test_fraction: fraction of complete subjects for test.
        seed: split seed.
        check_headers: ``False`` skips every check (as ``check="none"``).
        tolerance: tolerance for the grid check.
        check: ``"none"``, ``"header"`` (every NIfTI header: unreadable files, non-3D or complex volumes,
            modalities not on one grid: shape, spacing, orientation within ``tolerance``) or ``"full"`` (default:
            also read every voxel: truncated files, NaN / Inf, a non-integer segmentation). Errors name the subject
            and the file; nothing is written.

    When no subject is complete, the datalist still lists every subject under ``"incomplete"`` (empty splits),
    the input of ``python -m damm.tasks.impute``; a warning says so.

    Returns:
        The datalist path.

    Raises:
        FileNotFoundError: missing root.
        ValueError: no subject, inconsistent naming, failed checks, an unknown ``check``.
    """
    if check not in CHECK_LEVELS:
        raise ValueError(f"check must be one of {CHECK_LEVELS}, got {check!r}")
    level = check if check_headers else "none"
    root = Path(root)
    subjects = find_subjects(root)
    if level != "none":
        for subject, info in subjects.items():
            _check_headers(subject, info["files"], tolerance, level)
    complete = sorted(s for s, i in subjects.items() if all(m in i["files"] for m in MODALITIES))
    if not complete:
        warnings.warn(
            f"{root}: no subject has all of {list(MODALITIES)}; all {len(subjects)} are listed as incomplete "
            "(candidates for python -m damm.tasks.impute); the training/validation/test splits are empty",
            UserWarning,
            stacklevel=2,
        )
    out_path = default_datalist_path(root, datalist)
    base = out_path.resolve().parent
    split_of = assign_splits(complete, val_fraction, test_fraction, seed) if complete else {}
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
    return write_datalist(data, out_path, keep_field="incomplete")


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
    parser.add_argument(
        "--check",
        choices=list(CHECK_LEVELS),
        default="full",
        help="check headers only, or also every voxel (NaN/Inf, truncated files, integer segmentation)",
    )
    parser.add_argument("--no-header-check", action="store_true", help="skip every check (as --check none)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="spacing/orientation tolerance (mm)")
    add_split_args(parser, "subjects")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            path = convert(
                args.root,
                args.datalist,
                args.val_fraction,
                args.test_fraction,
                args.seed,
                not args.no_header_check,
                args.tolerance,
                check=args.check,
            )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

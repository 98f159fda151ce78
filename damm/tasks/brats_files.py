"""BraTS file conventions: naming schemes, subject discovery, and the header-only grid check of a subject's files.

Accepted naming schemes (detected per subject):

==============  ======================================  ==========================================
scheme          example files                           canonical keys
==============  ======================================  ==========================================
``brats2021``   ``BraTS2021_00000_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair``, ``_seg``     t1, t1c, t2, flair, seg
``brats2023``   ``BraTS-GLI-00000-000-t1n.nii.gz``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg``  t1, t1c, t2, flair, seg
``plain``       ``t1.nii.gz``, ``t1c``, ``t2``, ``flair``, ``seg`` (one folder per subject)  same
==============  ======================================  ==========================================

Used at run time by :mod:`damm.tasks.brats` and :mod:`damm.tasks.impute`, and by the offline converter
``python -m data_prep.brats``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib

from ddcore.images import is_nifti
from transforms.checks import check_coregistered, geometry_from_affine

__all__ = [
    "LABEL_KEY",
    "MODALITIES",
    "SCHEMES",
    "check_subject_files",
    "detect_scheme",
    "find_subjects",
    "modality_filename",
    "scheme_of",
    "subject_files",
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


def scheme_of(path: str | os.PathLike) -> tuple[str, str]:
    """(naming scheme, subject file prefix) of one modality file (``("plain", "")`` when none matches).

    Args:
        path: a modality file.

    Returns:
        The scheme and the file prefix.
    """
    c = _classify(Path(path).name)
    return ("plain", "") if c is None else (c[0], c[2])


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


def _group(subject: str, folder: Path, files: Sequence[Path]) -> dict[str, Any]:
    """Scheme, file prefix and ``{key: path}`` of one subject's files (consistency checked)."""
    try:
        scheme = detect_scheme(files)
    except ValueError as err:
        raise ValueError(f"subject {subject!r} ({folder}): {err}") from err
    classified = [(f, _classify(f.name)) for f in files]
    classified = [(f, c) for f, c in classified if c is not None]
    prefixes = {c[2] for _, c in classified}
    if len(prefixes) > 1:
        raise ValueError(f"subject {subject!r} ({folder}): files with different subject prefixes {sorted(prefixes)}")
    found: dict[str, Path] = {}
    for f, c in classified:
        if c[1] in found:
            raise ValueError(f"subject {subject!r}: modality {c[1]!r} given twice ({found[c[1]].name}, {f.name})")
        found[c[1]] = f
    return {"scheme": scheme, "file_prefix": prefixes.pop(), "folder": folder, "files": found}


def subject_files(folder: str | os.PathLike) -> dict[str, Any]:
    """Modality files of one subject folder, in any supported naming scheme (:data:`SCHEMES`).

    Args:
        folder: the subject's folder.

    Returns:
        ``{"subject", "folder", "scheme", "file_prefix", "files": {key: Path}}``.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: no BraTS-style file, mixed schemes or prefixes, a modality given twice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"subject folder not found: {folder}")
    names = [p for p in sorted(folder.iterdir()) if p.is_file() and is_nifti(p)]
    return {"subject": folder.name, **_group(folder.name, folder, names)}


def find_subjects(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Discover subjects (sub-folders; BraTS 2021/2023 files may also lie flat in ``root``) and their files.

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
    return {subject: _group(subject, folder, files) for subject, (folder, files) in groups.items()}


def check_subject_files(
    files: Mapping[str, str | os.PathLike], tolerance: float = 1e-3, check_origin: bool = True
) -> dict[str, Any]:
    """Check (headers only, before any work) that the files exist, are 3D and share one voxel grid.

    Only the NIfTI headers are read (nibabel loads the data lazily), so a dataset is checked in seconds before
    training; the rule and the message are those of :func:`transforms.checks.check_coregistered`, the rule
    :class:`transforms.checks.CheckCoregisteredd` applies to the loaded volumes.

    Args:
        files: ``{modality: path}``.
        tolerance: on spacing (mm), direction cosines and origin (mm).
        check_origin: also compare the origins.

    Returns:
        ``{"shape", "affine"}`` of the common grid.

    Raises:
        FileNotFoundError: a missing file.
        ValueError: unreadable, not 3D, or not co-registered (names every file with its shape and spacing).
    """
    geo, affines = {}, {}
    for key, path in files.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"modality {key!r}: file not found: {path}")
        try:
            header = nib.load(str(path))  # header only: the voxels are not read
            shape, affine = tuple(int(s) for s in header.shape), header.affine
        except Exception as err:
            raise ValueError(f"cannot read {key!r} file {path}: {type(err).__name__}: {err}") from err
        if len(shape) != 3:
            raise ValueError(f"{key!r} file {path} is {len(shape)}D {shape}; expected a 3D volume")
        geo[key], affines[key] = geometry_from_affine(shape, affine), affine
    check_coregistered(
        geo,
        {k: Path(p).name for k, p in files.items()},
        tolerance,
        tolerance,
        tolerance if check_origin else None,
    )
    ref = next(iter(geo))
    return {"shape": geo[ref]["shape"], "affine": affines[ref]}

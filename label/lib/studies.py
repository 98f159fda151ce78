"""Find a study's modality files: the other modalities next to the study image, or one multi-channel file.

A MONAI Label *study* is one image of the datastore. For DAMM synthesis it stands for one subject (BraTS) or one
field / tile (microscopy, NP): the task needs every *condition* modality of the bundle, found by the project's
naming conventions (see ``bundle/docs/data.md`` and ``bundle/docs/tasks.md``):

==================  =====================================================  ======================================
convention          study image -> the other modalities                    example
==================  =====================================================  ======================================
multi-channel file  one file whose channels are the conditions, in order    ``case.nii.gz`` 4D ``(X, Y, Z, C)``,
                    (NIfTI 4D, last axis; TIFF ``(C, H, W)``/``(H, W, C)``)  ``tile.tif`` ``(2, 64, 64)``
BraTS 2021          ``<subject>_<tag>.nii.gz``, tags t1 t1ce t2 flair      ``BraTS2021_00000_t2.nii.gz``
BraTS 2023          ``<subject>-<tag>.nii.gz``, tags t1n t1c t2w t2f       ``BraTS-GLI-00000-000-t2w.nii.gz``
BraTS plain         ``t1.nii.gz``, ``t1c``, ``t2``, ``flair`` in a subject folder
channel files       ``<field>_<channel>.<ext>`` side by side               ``tile_00007_vessel.png``
NP folder layout    ``ROOT/<modality folder>/<name>``: ``np/ vessel/        ``ROOT/vessel/tile_00007.png`` ->
                    nuclei/`` or the official ``QD/ CD31/ DAPI/``          ``ROOT/nuclei/tile_00007.png``
==================  =====================================================  ======================================

The BraTS schemes come from :mod:`damm.tasks.brats_files` and the NP folder names from
:mod:`data_prep.damm_folders` (the checkout this app lies in is first on ``sys.path``). Every failure raises
:class:`StudyError`, whose message names the file(s).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from damm.tasks.brats_files import SCHEMES as BRATS_SCHEMES
from damm.tasks.brats_files import modality_filename
from data_prep.damm_folders import LAYOUTS
from data_prep.damm_folders import MODALITIES as NP_MODALITIES

__all__ = ["NIFTI", "StudyError", "find_modalities", "is_nifti", "split_channels", "stem_and_suffix"]

NIFTI = (".nii.gz", ".nii")
IMAGE_2D = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

#: modality key -> folder / channel names that stand for it: the key itself and its folder in each NP layout of
#: ``data_prep.damm_folders`` (``np/`` or ``QD/`` for ``np_signal``, ...)
ALIASES: dict[str, tuple[str, ...]] = {
    key: tuple(dict.fromkeys([key, *(layout[key] for layout in LAYOUTS.values())])) for key in NP_MODALITIES
}


class StudyError(ValueError):
    """A study whose modalities cannot be found or do not fit the bundle (reported to the client as a 4xx)."""


def stem_and_suffix(path: str | Path) -> tuple[str, str]:
    """``("BraTS2021_00000_t2", ".nii.gz")`` for ``.../BraTS2021_00000_t2.nii.gz``."""
    name = Path(path).name
    low = name.lower()
    for suffix in (*NIFTI, *IMAGE_2D):
        if low.endswith(suffix):
            return name[: -len(suffix)], name[len(name) - len(suffix) :]
    return Path(name).stem, Path(name).suffix


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` names a NIfTI file."""
    return str(path).lower().endswith(NIFTI)


def _aliases(key: str) -> tuple[str, ...]:
    return ALIASES.get(key, (key,))


def _same_suffix_sibling(folder: Path, stem: str, suffix: str) -> Path | None:
    """``folder/stem + suffix``, or the same stem with another supported extension (case-insensitive)."""
    exact = folder / f"{stem}{suffix}"
    if exact.is_file():
        return exact
    if not folder.is_dir():
        return None
    wanted = stem.lower()
    for p in sorted(folder.iterdir()):
        s, x = stem_and_suffix(p)
        if p.is_file() and s.lower() == wanted and x.lower() in (*NIFTI, *IMAGE_2D):
            return p
    return None


def _brats(image: Path, keys: Sequence[str]) -> dict[str, Path] | None:
    """BraTS 2021 / 2023 / plain siblings of ``image`` (``None`` when its name follows no BraTS scheme).

    The schemes are the project's own (:data:`damm.tasks.brats_files.SCHEMES`).
    """
    _, suffix = stem_and_suffix(image)
    for scheme, spec in BRATS_SCHEMES.items():
        match = spec["regex"].match(image.name)
        if match:
            subject = match.groupdict().get("subject") or ""
            return {k: image.parent / modality_filename(scheme, k, subject, ext=suffix) for k in keys}
    return None


def _channel_files(image: Path, keys: Sequence[str]) -> dict[str, Path] | None:
    """``<field>_<channel>`` siblings (``None`` when the study's own channel is not one of the modalities)."""
    stem, suffix = stem_and_suffix(image)
    if "_" not in stem:
        return None
    field, channel = stem.rsplit("_", 1)
    known = {a.lower() for k in [*keys, *ALIASES] for a in _aliases(k)}
    if channel.lower() not in known:
        return None
    found = {}
    for k in keys:
        hit = next((p for a in _aliases(k) if (p := _same_suffix_sibling(image.parent, f"{field}_{a}", suffix))), None)
        found[k] = hit or image.parent / f"{field}_{k}{suffix}"
    return found


def _folder_layout(image: Path, keys: Sequence[str]) -> dict[str, Path] | None:
    """``ROOT/<modality folder>/<name>`` siblings (``None`` when the parent folder names no modality)."""
    folder = image.parent.name.lower()
    if not any(folder == a.lower() for k in [*keys, *ALIASES] for a in _aliases(k)):
        return None
    root = image.parent.parent
    stem, suffix = stem_and_suffix(image)
    found = {}
    for k in keys:
        hit = next((p for a in _aliases(k) if (p := _same_suffix_sibling(root / a, stem, suffix))), None)
        found[k] = hit or root / k / image.name
    return found


def _channel_count(image: Path) -> tuple[int | None, tuple[int, ...]]:
    """(channel axis or None, shape) of a file that may hold several modalities."""
    if is_nifti(image):
        import nibabel as nib

        try:
            shape = tuple(int(s) for s in nib.load(str(image)).shape)
        except Exception as err:
            raise StudyError(f"cannot read {image}: {type(err).__name__}: {err}") from err
        return (3 if len(shape) == 4 else None), shape
    if stem_and_suffix(image)[1].lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(str(image)) as tif:
                shape = tuple(int(s) for s in tif.series[0].shape)
        except Exception as err:
            raise StudyError(f"cannot read {image}: {type(err).__name__}: {err}") from err
        if len(shape) == 3:
            return (0 if shape[0] <= shape[-1] else 2), shape
        return None, shape
    return None, ()


def split_channels(image: Path, keys: Sequence[str], out_dir: Path) -> dict[str, Path]:
    """Write each channel of a multi-channel study as its own file (same format; NIfTI keeps the affine).

    Args:
        image: the multi-channel file.
        keys: the modality of each channel, in order (the bundle's ``conditions``).
        out_dir: where to write ``<key>.<ext>``.

    Returns:
        ``{key: path}``.

    Raises:
        StudyError: the channel count differs from ``len(keys)``.
    """
    axis, shape = _channel_count(image)
    if axis is None or shape[axis] != len(keys):
        raise StudyError(
            f"{image.name}: a multi-channel study needs one channel per condition {list(keys)} "
            f"({len(keys)} channels), got shape {shape}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_nifti(image):
        import nibabel as nib

        img = nib.load(str(image))
        data = np.asanyarray(img.dataobj)
        files = {}
        for i, k in enumerate(keys):
            header = img.header.copy()
            one = nib.Nifti1Image(np.ascontiguousarray(data[..., i]), img.affine, header)
            one.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
            one.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
            files[k] = out_dir / f"{k}.nii.gz"
            nib.save(one, str(files[k]))
        return files
    import tifffile

    data = np.asarray(tifffile.imread(str(image)))
    files = {}
    for i, k in enumerate(keys):
        files[k] = out_dir / f"{k}.tif"
        tifffile.imwrite(str(files[k]), np.ascontiguousarray(np.take(data, i, axis=axis)))
    return files


def find_modalities(image: str | Path, keys: Sequence[str], spatial_dims: int, work_dir: Path) -> dict[str, Path]:
    """The file of every modality in ``keys`` for the study ``image``.

    Args:
        image: the study image (a datastore path).
        keys: the modalities needed (the bundle's ``conditions``, anchor first).
        spatial_dims: 2 (tiles, fields) or 3 (volumes), the bundle's input dimension.
        work_dir: scratch folder for the channels of a multi-channel study.

    Returns:
        ``{key: path}``, every path an existing file.

    Raises:
        StudyError: the image is missing, has the wrong dimension, or a modality file is missing (named).
    """
    image = Path(image)
    if not image.is_file():
        raise StudyError(f"study image not found: {image}")
    volume = is_nifti(image)
    if spatial_dims == 3 and not volume:
        raise StudyError(f"{image.name}: this model synthesises 3D volumes and needs NIfTI input (.nii/.nii.gz)")
    if spatial_dims == 2 and volume:
        raise StudyError(f"{image.name}: this model synthesises 2D images (PNG/TIFF/JPEG), got a NIfTI file")
    axis, shape = _channel_count(image)
    if axis is not None and shape[axis] == len(keys) and (volume or len(keys) > 1):
        return split_channels(image, keys, work_dir)
    if volume and len(shape) != 3:
        raise StudyError(f"{image.name}: expected a 3D volume or a 4D file with {len(keys)} channels, got {shape}")
    found = None
    for rule in (_brats, _channel_files, _folder_layout) if volume else (_channel_files, _folder_layout):
        found = rule(image, keys)
        if found is not None:
            break
    if found is None:
        raise StudyError(
            f"{image.name}: cannot tell which modality this file is; name it by a BraTS scheme "
            "(<subject>_t2.nii.gz, <subject>-t2w.nii.gz, t2.nii.gz), as a channel file <field>_<channel>.<ext> "
            "or put it in a modality folder (vessel/, nuclei/, CD31/, DAPI/), or send one multi-channel file "
            f"with the channels {list(keys)}"
        )
    missing = {k: p for k, p in found.items() if not p.is_file()}
    if missing:
        named = ", ".join(f"{k!r} ({p})" for k, p in missing.items())
        raise StudyError(f"study {image.name}: missing modality file(s) {named}; needed: {list(keys)}")
    return found


_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file-system-safe version of an image id."""
    return _NAME_OK.sub("_", text).strip("._") or "study"

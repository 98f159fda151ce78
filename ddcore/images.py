"""Reading and writing medical images through MONAI: one reader and one NIfTI writer for the whole project.

:func:`load_image` is MONAI's :class:`~monai.transforms.LoadImage` (channel-first ``MetaTensor`` with the
file's affine) with one-line errors naming the file. :func:`save_nifti_like` writes an array on the grid of a
reference NIfTI file with MONAI's :class:`~monai.data.NibabelWriter` (the backend of ``SaveImage``), keeping
the reference's qform and sform *and their codes* (MONAI's writer sets both to the affine with code 1, which
would turn e.g. a scanner-anchored qform into an aligned one), crash-safely through :func:`ddcore.atomic.atomic_path`.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import LoadImage

from ddcore.atomic import atomic_path

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "load_image", "save_nifti_like"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_image(path: str | os.PathLike, name: str = "image", channel_first: bool = True) -> MetaTensor:
    """Read an image with MONAI's ``LoadImage`` (NIfTI through nibabel, so the affine is the file's own).

    Args:
        path: the file.
        name: what the file is (used in messages), e.g. the datalist key.
        channel_first: add / move the channel axis first (``ensure_channel_first``).

    Returns:
        The image as a ``MetaTensor`` (``.affine`` and ``.meta`` from the file).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: file not found: {path}")
    reader = "NibabelReader" if is_nifti(path) else None
    try:
        return LoadImage(image_only=True, ensure_channel_first=channel_first, reader=reader)(str(path))
    except Exception as err:  # the readers raise many kinds
        raise ValueError(f"{name}: cannot read {path}: {type(err).__name__}: {err}") from err


def save_nifti_like(
    array: np.ndarray | torch.Tensor,
    reference: str | os.PathLike,
    path: str | os.PathLike,
    dtype: np.dtype | type | str = np.float32,
    intent: str | None = None,
) -> Path:
    """Write ``array`` as NIfTI on the grid of ``reference``, with its affine, qform and sform, atomically.

    Args:
        array: ``[*S]`` on the reference grid, ``[1, *S]`` (one channel first), or ``[*S, ..., k]`` for vector
            images whose leading axes equal the reference shape (e.g. a displacement field stored
            ``(X, Y, Z, 1, d)``).
        reference: the NIfTI file whose geometry the output keeps.
        path: destination (``.nii`` or ``.nii.gz``).
        dtype: output data type (default float32, scale slope 1, intercept 0).
        intent: when set, the header's intent is "vector" with this name (for fields).

    Returns:
        ``path``.

    Raises:
        ValueError: ``reference`` is not NIfTI, or ``array`` is not on its grid.
    """
    if not is_nifti(reference):
        raise ValueError(f"save_nifti_like: reference {reference} is not a NIfTI file")
    ref = nib.load(str(reference))
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    shape = tuple(ref.shape[:3]) if len(ref.shape) > 3 else tuple(ref.shape)
    if data.ndim == len(shape) + 1 and data.shape[0] == 1 and data.shape[1:] == shape:
        data = data[0]
    if data.shape[: len(shape)] != shape:
        raise ValueError(f"save_nifti_like: array shape {data.shape} is not on the grid {shape} of {reference}")
    header = ref.header.copy()
    header.set_data_dtype(np.dtype(dtype))
    image = NibabelWriter.create_backend_obj(data, affine=ref.affine, dtype=np.dtype(dtype), header=header)
    image.header.set_slope_inter(1.0, 0.0)
    qform, qcode = ref.header.get_qform(coded=True)
    sform, scode = ref.header.get_sform(coded=True)
    image.set_qform(qform, int(qcode))  # None with code 0 where the reference has none
    image.set_sform(sform, int(scode))
    if intent:
        image.header.set_intent("vector", (), name=intent)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)

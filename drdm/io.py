"""DRDM file I/O on the project's image layer: volumes as ``MetaTensor``, outputs on the input's geometry.

Volumes are read with :func:`ddcore.images.load_image` (MONAI ``LoadImage``: a channel-first ``MetaTensor`` with
the file's affine, arrays in the file's axis order) and written with :func:`ddcore.images.save_nifti_like` (on the
grid of the source file, keeping its affine, qform and sform, atomically). Displacement fields are NIfTI vector
images ``(X, Y, Z, 1, d)`` with intent name ``ddf_voxels``. :func:`deformation_stats` turns a field into the
numbers of the DRDM reports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from nibabel.nifti1 import data_type_codes

from ddcore.content import check_finite, check_real_file
from ddcore.images import load_image, save_nifti_like
from drdm.fields import check_field, folding_fraction

__all__ = [
    "deformation_stats",
    "file_dtype",
    "read_ddf",
    "read_volume",
    "save_ddf",
    "save_volume",
    "source_path",
    "spacing",
]

DDF_INTENT = "ddf_voxels"


def read_volume(path: str | os.PathLike, spatial_dims: int | None = None, name: str = "image") -> MetaTensor:
    """Read a one-channel NIfTI volume as a channel-first ``MetaTensor`` ``[1, *S]`` (float32, file axis order).

    Args:
        path: file to read.
        spatial_dims: expected number of spatial dims; trailing singleton axes are dropped to reach it (a 2D
            slice stored as ``(X, Y, 1)`` reads as ``[1, X, Y]``).
        name: what the file is (used in messages).

    Returns:
        The volume; ``.affine`` is the file's, ``.meta`` holds its header (see :func:`spacing`,
        :func:`file_dtype`, :func:`source_path`).

    Raises:
        FileNotFoundError: missing file.
        ValueError: unreadable file, complex or non-finite values (NaN/Inf), more than one channel or wrong number
            of spatial dims.
    """
    check_real_file(path, name)  # before the float cast, which would drop an imaginary part
    volume = load_image(path, name)
    check_finite(volume, name, str(path))
    while spatial_dims is not None and volume.ndim - 1 > spatial_dims and volume.shape[-1] == 1:
        volume = volume[..., 0]
    spatial = volume.ndim - 1
    if volume.shape[0] != 1 or spatial not in (2, 3) or (spatial_dims is not None and spatial != spatial_dims):
        want = spatial_dims or "2 or 3"
        raise ValueError(
            f"{name}: {path} has shape {tuple(volume.shape[1:]) if volume.shape[0] == 1 else tuple(volume.shape)}; "
            f"expected {want} spatial dims and one channel."
        )
    return volume


def source_path(volume: MetaTensor | str | os.PathLike) -> Path:
    """The file a volume was read from (a path is returned as is).

    Args:
        volume: a volume of :func:`read_volume`, or a file path.

    Returns:
        The path.
    """
    if isinstance(volume, MetaTensor):
        return Path(str(volume.meta["filename_or_obj"]))
    return Path(volume)


def spacing(volume: MetaTensor) -> tuple[float, ...]:
    """Voxel size per spatial array axis (column norms of the affine, :func:`monai.data.utils.affine_to_spacing`).

    Args:
        volume: a volume of :func:`read_volume`.

    Returns:
        One size per spatial axis of ``volume`` (mm).
    """
    return tuple(float(s) for s in affine_to_spacing(volume.affine, r=3)[: volume.ndim - 1])


def file_dtype(volume: MetaTensor) -> np.dtype:
    """The data type stored in the file a volume was read from (``read_volume`` returns float32).

    Args:
        volume: a volume of :func:`read_volume`.

    Returns:
        The NIfTI header's data type (e.g. ``uint8`` for a label map).
    """
    return np.dtype(data_type_codes.dtype[int(volume.meta["datatype"])])


def save_volume(
    array: np.ndarray | torch.Tensor,
    reference: MetaTensor | str | os.PathLike,
    path: str | os.PathLike,
    dtype: np.dtype | type | str = np.float32,
) -> Path:
    """Write ``array`` (``[*S]`` on the reference grid) as NIfTI on the geometry of the reference file, atomically.

    Args:
        array: data on the reference grid (a 2D slice ``[X, Y]`` of a ``(X, Y, 1)`` file is stored ``(X, Y, 1)``).
        reference: the volume (or file) whose grid, affine, qform and sform are kept.
        path: destination (``.nii`` or ``.nii.gz``).
        dtype: output data type.

    Returns:
        The destination path.

    Raises:
        ValueError: ``array`` is not on the reference grid.
    """
    ref = source_path(reference)
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if isinstance(reference, MetaTensor):
        grid = tuple(reference.shape[1:])
        if data.shape != grid:
            raise ValueError(f"save_volume: array {data.shape} is not on the reference grid {grid} of {ref}.")
        data = data.reshape(tuple(int(n) for n in reference.meta["spatial_shape"]))
    return save_nifti_like(data, ref, path, dtype=dtype)


def save_ddf(ddf: torch.Tensor, reference: MetaTensor, path: str | os.PathLike) -> Path:
    """Write a voxel-unit field ``[d, *S]`` as a NIfTI vector image ``(X, Y, Z, 1, d)`` on the reference grid.

    Component ``i`` is the displacement along array axis ``i`` in voxels (MONAI ``Warp`` convention,
    pull-back ``out(x) = in(x + u(x))``); a 2D field is stored as ``(X, Y, 1, 1, 2)``.

    Args:
        ddf: ``[d, *S]`` field.
        reference: the volume whose grid and geometry are used.
        path: destination.

    Returns:
        The destination path.
    """
    check_field(ddf[None], "ddf", tuple(reference.shape[1:]))
    data = np.moveaxis(ddf.detach().cpu().numpy().astype(np.float32), 0, -1)  # [*S, d]
    grid = tuple(int(n) for n in reference.meta["spatial_shape"])
    data = data.reshape(*grid, *([1] * (3 - len(grid))), 1, data.shape[-1])
    return save_nifti_like(data, source_path(reference), path, intent=DDF_INTENT)


def read_ddf(path: str | os.PathLike, spatial_dims: int) -> torch.Tensor:
    """Read a field written by :func:`save_ddf` back as ``[d, *S]`` (voxels, component ``i`` along array axis ``i``).

    Args:
        path: the ``*_ddf.nii.gz`` file.
        spatial_dims: ``d`` (a 2D field stored as ``(X, Y, 1, 1, 2)`` reads as ``[2, X, Y]``).

    Returns:
        The float32 field.

    Raises:
        ValueError: the file does not hold a ``d``-component vector image.
    """
    check_real_file(path, "ddf")
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] != spatial_dims:
        raise ValueError(f"ddf: {path} has shape {data.shape}; expected (X, Y, Z, 1, {spatial_dims}) from save_ddf.")
    field = torch.from_numpy(np.moveaxis(data[:, :, :, 0], -1, 0).copy())
    if spatial_dims == 2:
        if field.shape[-1] != 1:
            raise ValueError(f"ddf: {path} has shape {data.shape}; a 2D field is stored as (X, Y, 1, 1, 2).")
        field = field[..., 0]
    check_finite(field, "ddf", str(path))
    return field


def deformation_stats(
    ddf: torch.Tensor, spacing: Sequence[float], mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Displacement statistics of one field ``[d, *S]`` (voxels) on a grid with voxel ``spacing``.

    Percentages are relative to the longest physical edge of the image.

    Args:
        ddf: ``[d, *S]`` field in voxels.
        spacing: voxel size per axis (mm).
        mask: optional ``[*S]`` region for the statistics.

    Returns:
        ``mean_displacement_mm``, ``p99_displacement_mm``, ``max_displacement_mm``, the same in ``_vox`` and
        ``_pct`` (of the image size), ``image_size_mm`` and ``folding_fraction``.
    """
    d = check_field(ddf[None], "ddf")
    scale = torch.as_tensor(list(spacing)[:d], dtype=ddf.dtype, device=ddf.device).view(d, *([1] * d))
    mm = (ddf * scale).norm(dim=0).flatten()
    vox = ddf.norm(dim=0).flatten()
    sel = mask.reshape(-1).bool().to(ddf.device) if mask is not None else None
    if sel is not None and bool(sel.any()):
        mm, vox = mm[sel], vox[sel]
    extent = max(n * float(s) for n, s in zip(ddf.shape[1:], spacing))

    def q99(x: torch.Tensor) -> float:
        x = x.double()
        return float(torch.quantile(x[:: max(1, x.numel() // 2_000_000)], 0.99)) if x.numel() else 0.0

    stats = {
        "mean_displacement_mm": float(mm.mean()),
        "p99_displacement_mm": q99(mm),
        "max_displacement_mm": float(mm.max()),
        "mean_displacement_vox": float(vox.mean()),
        "p99_displacement_vox": q99(vox),
        "image_size_mm": extent,
    }
    stats["mean_displacement_pct"] = 100.0 * stats["mean_displacement_mm"] / extent
    stats["p99_displacement_pct"] = 100.0 * stats["p99_displacement_mm"] / extent
    stats["max_displacement_pct"] = 100.0 * stats["max_displacement_mm"] / extent
    stats["folding_fraction"] = float(folding_fraction(ddf[None])[0])
    return stats

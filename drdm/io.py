"""DRDM file I/O: NIfTI volumes on the input geometry, displacement statistics, checkpoints.

Everything is written atomically through :mod:`ddcore.atomic`. Volumes are read and written with nibabel so the
output keeps the input's affine (spacing, orientation, origin) exactly; arrays stay in the file's axis order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from ddcore.atomic import atomic_path
from drdm.fields import check_field, folding_fraction

__all__ = [
    "Volume",
    "deformation_stats",
    "latest_checkpoint",
    "load_network_weights",
    "read_volume",
    "save_ddf",
    "save_volume",
]


class Volume:
    """A volume read from disk: array in file axis order plus its geometry.

    Args:
        array: ``[*S]`` numpy array (2 or 3 spatial dims).
        affine: 4x4 voxel-to-world (RAS) matrix.
        header: the source NIfTI header (kept for dtype / units), or ``None``.
        path: where it came from.
    """

    def __init__(self, array: np.ndarray, affine: np.ndarray, header: Any = None, path: str | None = None) -> None:
        self.array = array
        self.affine = np.asarray(affine, dtype=np.float64)
        self.header = header
        self.path = path

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size per array axis (column norms of the affine)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(s) for s in norms[: self.array.ndim])


def read_volume(path: str | os.PathLike, spatial_dims: int | None = None, name: str = "image") -> Volume:
    """Read a NIfTI file as a :class:`Volume`.

    Args:
        path: file to read.
        spatial_dims: expected number of spatial dims; a trailing singleton axis is dropped to reach it (a 2D
            slice stored as ``(X, Y, 1)``).
        name: what the file is (used in messages).

    Returns:
        The volume.

    Raises:
        FileNotFoundError: missing file.
        ValueError: unreadable file or wrong number of dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: file not found: {path}")
    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises many kinds
        raise ValueError(f"{name}: cannot read {path} as NIfTI: {err}") from err
    while spatial_dims is not None and array.ndim > spatial_dims and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (spatial_dims is not None and array.ndim != spatial_dims):
        want = spatial_dims or "2 or 3"
        raise ValueError(f"{name}: {path} has shape {array.shape}; expected {want} spatial dims and one channel.")
    return Volume(array, img.affine, img.header, str(path))


def save_volume(
    array: np.ndarray | torch.Tensor,
    reference: Volume,
    path: str | os.PathLike,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``array`` (``[*S]``, same grid as ``reference``) as NIfTI with the reference's affine, atomically.

    Args:
        array: data on the reference grid.
        reference: volume whose geometry is copied.
        path: destination (``.nii`` or ``.nii.gz``).
        dtype: output dtype (default: keep the array's).

    Returns:
        The destination path.
    """
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if data.shape[: reference.array.ndim] != reference.array.shape:
        raise ValueError(f"save_volume: array {data.shape} is not on the reference grid {reference.array.shape}.")
    if dtype is not None:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, reference.affine)
    if reference.header is not None and hasattr(reference.header, "get_xyzt_units"):
        img.header.set_xyzt_units(*reference.header.get_xyzt_units())
    img.set_qform(reference.affine, code=1)
    img.set_sform(reference.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def save_ddf(ddf: torch.Tensor, reference: Volume, path: str | os.PathLike) -> Path:
    """Write a voxel-unit field ``[d, *S]`` as a NIfTI vector image ``(X, Y, Z, 1, d)`` on the reference grid.

    Component ``i`` is the displacement along array axis ``i`` in voxels (MONAI ``Warp`` convention,
    pull-back ``out(x) = in(x + u(x))``); a 2D field is stored as ``(X, Y, 1, 1, 2)``.

    Args:
        ddf: ``[d, *S]`` field.
        reference: volume whose grid and affine are used.
        path: destination.

    Returns:
        The destination path.
    """
    check_field(ddf[None], "ddf", reference.array.shape)
    data = np.moveaxis(ddf.detach().cpu().numpy().astype(np.float32), 0, -1)  # [*S, d]
    d = data.shape[-1]
    data = data.reshape(*reference.array.shape, *([1] * (3 - d)), 1, d)
    img = nib.Nifti1Image(data, reference.affine)
    img.header.set_intent("vector", (), name="ddf_voxels")
    img.set_qform(reference.affine, code=1)
    img.set_sform(reference.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


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


def latest_checkpoint(directory: str | os.PathLike, pattern: str = r"checkpoint_(\d+)\.pt$") -> str | None:
    """The checkpoint with the highest number in ``directory`` (numeric, not lexicographic order).

    Args:
        directory: checkpoint folder (may not exist).
        pattern: regex with one group capturing the step/epoch number.

    Returns:
        The path as a string, or ``None`` when there is none.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        m = re.search(pattern, p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), str(p)))
    return max(found)[1] if found else None


def load_network_weights(network: nn.Module, path: str | os.PathLike, key: str = "model") -> nn.Module:
    """Load weights saved as a plain state dict or as ``{key: state_dict, ...}`` (``weights_only=True``).

    Args:
        network: module to load into (strictly).
        path: checkpoint file.
        key: entry holding the network's state dict in a multi-object checkpoint.

    Returns:
        The network.

    Raises:
        FileNotFoundError: missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network weights not found: {path} (train first, or set the checkpoint path).")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if key in state and isinstance(state[key], dict):
        state = state[key]
    network.load_state_dict(state, strict=True)
    return network

"""Masked image-quality metrics for the real tasks: PSNR, SSIM and MAE inside a region (brain, tumour, field part).

Images are compared in ``[0, 1]`` (data range 1), the space of every metric in the project. Whole-image metrics
(``monai.metrics``) would count the background, which for skull-stripped MRI is a large, trivially correct
area; here every metric is an average over the voxels of a mask only:

- MAE and PSNR: over the mask's voxels (``PSNR = 10 log10(1 / MSE_mask)``).
- SSIM: the local SSIM map of MONAI's :func:`monai.metrics.regression.compute_ssim_and_cs` (Gaussian window,
  ``sigma = 1.5``) computed in 2D (per axial slice for volumes, so anisotropic or thin volumes work), averaged over
  the mask voxels whose whole window lies inside the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs

__all__ = ["masked_metrics", "region_metrics", "to_unit"]


def to_unit(x: Any, lower: float, upper: float) -> torch.Tensor:
    """Map intensities linearly so that ``lower -> 0`` and ``upper -> 1``, clipped to ``[0, 1]``.

    Args:
        x: image (array or tensor).
        lower: value mapped to 0.
        upper: value mapped to 1 (must exceed ``lower``).

    Returns:
        Float32 tensor in ``[0, 1]``.

    Raises:
        ValueError: ``upper <= lower``.
    """
    if not upper > lower:
        raise ValueError(f"to_unit: need upper > lower, got lower={lower}, upper={upper}")
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).float()
    return ((t - float(lower)) / (float(upper) - float(lower))).clamp(0.0, 1.0)


def _as_slices(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """2D image -> ``[1, 1, H, W]``; 3D volume -> ``[S, 1, H, W]`` with slices along ``axis``."""
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x.movedim(axis if axis is not None else 2, 0)[:, None]
    raise ValueError(f"expected a 2D image or 3D volume without channel dimension, got shape {tuple(x.shape)}")


def masked_metrics(
    prediction: Any,
    target: Any,
    mask: Any,
    win_size: int = 7,
    sigma: float = 1.5,
    axis: int | None = 2,
) -> dict[str, float]:
    """PSNR (dB), SSIM and MAE of ``prediction`` vs ``target`` (both already in ``[0, 1]``) inside ``mask``.

    Args:
        prediction: 2D ``[H, W]`` or 3D ``[X, Y, Z]`` image in ``[0, 1]``.
        target: same shape.
        mask: same shape; voxels ``> 0`` are evaluated.
        win_size: odd SSIM window size (in-plane).
        sigma: Gaussian SSIM window sigma.
        axis: slice axis of 3D volumes (SSIM is computed per slice in the other two axes).

    Returns:
        ``{"psnr", "ssim", "mae", "n_voxels"}``; metrics are NaN when the mask is empty.

    Raises:
        ValueError: shape mismatch or an even window.
    """
    p, t = torch.as_tensor(prediction).float(), torch.as_tensor(target).float()
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask) > 0
    if p.shape != t.shape or p.shape != m.shape:
        raise ValueError(
            f"masked_metrics: prediction {tuple(p.shape)}, target {tuple(t.shape)} and mask {tuple(m.shape)} "
            "must have the same shape"
        )
    if win_size % 2 != 1 or win_size < 3:
        raise ValueError(f"masked_metrics: win_size must be odd and >= 3, got {win_size}")
    n = int(m.sum())
    if n == 0:
        return {"psnr": float("nan"), "ssim": float("nan"), "mae": float("nan"), "n_voxels": 0}
    diff = (p - t)[m].double()
    mse = float((diff**2).mean())
    mae = float(diff.abs().mean())
    psnr = float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))
    ps, ts, ms = _as_slices(p, axis), _as_slices(t, axis), _as_slices(m, axis)
    h = win_size // 2
    ssim = float("nan")
    if ps.shape[-1] > 2 * h and ps.shape[-2] > 2 * h:
        keep = ms.any(dim=(1, 2, 3))  # only slices that hold mask voxels
        ssim_map, _ = compute_ssim_and_cs(
            ps[keep], ts[keep], spatial_dims=2, kernel_size=[win_size] * 2, kernel_sigma=[sigma] * 2, data_range=1.0
        )
        inner = ms[keep][..., h:-h, h:-h]
        if bool(inner.any()):
            ssim = float(ssim_map[inner].double().mean())
    return {"psnr": psnr, "ssim": ssim, "mae": mae, "n_voxels": n}


def region_metrics(
    prediction: Any, target: Any, regions: Mapping[str, Any], **kwargs: Any
) -> dict[str, dict[str, float]]:
    """:func:`masked_metrics` for several named regions (e.g. ``brain``, ``tumour``).

    Args:
        prediction: image in ``[0, 1]``.
        target: image in ``[0, 1]``.
        regions: ``{name: mask}``; ``None`` masks are skipped.
        kwargs: :func:`masked_metrics` options.

    Returns:
        ``{name: metrics}``.
    """
    return {name: masked_metrics(prediction, target, m, **kwargs) for name, m in regions.items() if m is not None}

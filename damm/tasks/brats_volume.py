"""BraTS volume geometry and whole-volume prediction: the held-out slab, slice batching, back to the input grid.

- :func:`heldout_slab` / :func:`slab_labels` / :func:`heldout_mask_input_grid`: the slice split in world
  superior-inferior coordinates (mm), so the same slab selects training slices in pipeline space and evaluated
  voxels on the input grid.
- :func:`predict_volume`: every axial slice holding brain through the predictor in one batch, stacked back.
- :func:`to_input_grid`: intensities back to the input scale, then MONAI ``ResampleToMatch`` onto the input grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch

from ddcore.images import load_image
from transforms.checks import affine_of
from transforms.intensity import denormalise
from transforms.slices import foreground_fractions

__all__ = [
    "axial_axis",
    "heldout_mask_input_grid",
    "heldout_slab",
    "pad_to",
    "predict_volume",
    "round_up",
    "size_multiple",
    "slab_labels",
    "slice_s_coords",
    "to_input_grid",
]


def size_multiple(ae_channels: Sequence[int], dm_channels: Sequence[int]) -> int:
    """In-plane size multiple needed by the autoencoder (``2**(levels-1)``) and the denoiser (``2**(levels-2)``).

    Args:
        ae_channels: autoencoder channels per level.
        dm_channels: denoiser channels per level.

    Returns:
        The product of both downsampling factors.
    """
    return 2 ** (len(ae_channels) - 1) * 2 ** max(len(dm_channels) - 2, 0)


def axial_axis(affine: np.ndarray) -> int:
    """Voxel axis most aligned with the superior-inferior world axis (RAS/LPS row 2)."""
    return int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))


def slice_s_coords(affine: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
    """World S coordinate (mm) of the centre of every slice along ``axis``."""
    centre = np.array([(s - 1) / 2.0 for s in shape[:3]], dtype=np.float64)
    idx = np.arange(shape[axis], dtype=np.float64)
    pts = np.repeat(centre[None], len(idx), axis=0)
    pts[:, axis] = idx
    return pts @ affine[2, :3] + affine[2, 3]


def heldout_slab(
    brain_s: np.ndarray, spacing_s: float, heldout_range: Sequence[float], gap_mm: float
) -> tuple[float, float, float]:
    """The held-out slab in world S coordinates (mm).

    Args:
        brain_s: S coordinates of the slices that hold brain.
        spacing_s: slice spacing (mm).
        heldout_range: ``(a, b)`` fractions of the brain's S extent (0 = lowest brain edge).
        gap_mm: margin around the slab excluded from training.

    Returns:
        ``(lo, hi, gap_mm)``: slices with ``lo <= S <= hi`` are held out; those within ``gap_mm`` of it are unused.

    Raises:
        ValueError: invalid fractions.
    """
    a, b = (float(v) for v in heldout_range)
    if not 0.0 <= a < b <= 1.0:
        raise ValueError(f"heldout_range must be two fractions 0 <= a < b <= 1, got {list(heldout_range)}")
    s_lo, s_hi = float(brain_s.min()) - spacing_s / 2, float(brain_s.max()) + spacing_s / 2
    return s_lo + a * (s_hi - s_lo), s_lo + b * (s_hi - s_lo), float(gap_mm)


def slab_labels(s: np.ndarray, slab: tuple[float, float, float]) -> np.ndarray:
    """``"test"`` inside the slab, ``"gap"`` within its margin, ``"training"`` elsewhere, per slice S coordinate."""
    lo, hi, gap = slab
    out = np.full(s.shape, "training", dtype=object)
    out[(s >= lo - gap) & (s <= hi + gap)] = "gap"
    out[(s >= lo) & (s <= hi)] = "test"
    return out


def pad_to(x: torch.Tensor, size: Sequence[int], value: float) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad ``[..., H, W]`` (centred) to ``size``; returns the padded tensor and (top, bottom, left, right)."""
    h, w = x.shape[-2:]
    dh, dw = int(size[0]) - h, int(size[1]) - w
    if dh < 0 or dw < 0:
        raise ValueError(f"slice of size {(h, w)} is larger than the padded size {tuple(size)}")
    pads = (dh // 2, dh - dh // 2, dw // 2, dw - dw // 2)
    return F.pad(x, (pads[2], pads[3], pads[0], pads[1]), value=value), pads


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return int(-(-int(n) // int(m)) * int(m))


def predict_volume(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    volumes: Sequence[Any],
    brain: Any,
    multiple: int = 16,
) -> MetaTensor:
    """Synthesise every axial slice holding brain (one batched predictor call) and stack them into a volume.

    Args:
        predictor: ``[N, n_in, H, W] -> [N, 1, H, W]`` in ``[-1, 1]``.
        volumes: the predictor's inputs, each ``[1, X, Y, Z]`` (conditions anchor first, or the true target for
            the autoencoder ceiling).
        brain: brain mask ``[1, X, Y, Z]``; slices without brain and voxels outside it are background (``-1``).
        multiple: in-plane sizes are padded (with ``-1``) to a multiple of this.

    Returns:
        ``[1, X, Y, Z]`` MetaTensor with the geometry (affine) of ``volumes[0]``.
    """
    ref = volumes[0]
    frac = foreground_fractions(brain, axis=2)
    z_idx = np.flatnonzero(frac > 0)
    x = torch.cat([torch.as_tensor(v).float() for v in volumes], dim=0)  # [n_in, X, Y, Z]
    slices = x.permute(3, 0, 1, 2)[torch.as_tensor(z_idx)]  # [N, n_in, X, Y]
    size = (round_up(slices.shape[-2], multiple), round_up(slices.shape[-1], multiple))
    padded, (t, b, left, r) = pad_to(slices, size, -1.0)
    with torch.no_grad():
        pred = predictor(padded).float().cpu()
    pred = pred[..., t : size[0] - b, left : size[1] - r]
    out = torch.full((1, *x.shape[1:]), -1.0)
    out[..., torch.as_tensor(z_idx)] = pred[:, :1].permute(1, 2, 3, 0)
    out = torch.where(torch.as_tensor(brain) > 0, out, torch.full_like(out, -1.0))
    return MetaTensor(
        out, affine=torch.as_tensor(affine_of(ref)), meta={"space": getattr(ref, "meta", {}).get("space", "RAS")}
    )


def to_input_grid(
    prediction: MetaTensor,
    brain: Any,
    intensity: Mapping[str, float],
    reference: str | Path | MetaTensor,
    input_brain: Any = None,
) -> np.ndarray:
    """Map a ``[-1, 1]`` prediction back to the input scale and resample it onto the reference file's voxel grid.

    The prediction is clamped to ``[-1, 1]`` first, so the output lies in ``[lower, upper]`` inside the brain and
    is 0 outside it: with ``input_brain``, brain voxels at the brain's edge (where the resampling blends in the
    background) are raised to ``lower``; every value is ``>= 0``.

    Args:
        prediction: ``[1, X, Y, Z]`` in pipeline space (with its affine).
        brain: brain mask in pipeline space (outside -> 0).
        intensity: ``{"lower", "upper"}`` of the target's normalisation (``-1 -> lower``, ``1 -> upper``).
        reference: the input file whose grid the output takes, or that file already loaded (channel-first
            ``MetaTensor`` from :func:`ddcore.images.load_image`, as :class:`damm.tasks.brats.PreparedSubject` keeps
            it, so a subject evaluated with several methods is read once).
        input_brain: optional brain mask on the input grid (outside -> 0).

    Returns:
        ``[X0, Y0, Z0]`` float32 array in the reference's voxel order: in ``[lower, upper]`` inside ``input_brain``
        (in ``[0, upper]`` without it), 0 outside, never below 0.
    """
    lower, upper = float(intensity["lower"]), float(intensity["upper"])
    params = {"lower": lower, "upper": upper, "out_min": -1.0, "out_max": 1.0}
    vol = denormalise(prediction.as_tensor().float().clamp(-1.0, 1.0), params)
    vol = torch.where(torch.as_tensor(brain) > 0, vol, torch.zeros_like(vol)).clamp_min(0.0)
    meta = {k: v for k, v in prediction.meta.items() if k not in ("affine", "original_affine")}
    img = MetaTensor(vol, affine=prediction.affine, meta=meta)
    dst = reference if isinstance(reference, MetaTensor) else load_image(reference, "reference")
    out = ResampleToMatch(mode="bilinear", padding_mode="zeros")(img, img_dst=dst)
    arr = np.clip(torch.as_tensor(out).float().numpy()[0], 0.0, max(upper, 0.0))
    if input_brain is not None:
        arr = np.where(np.asarray(input_brain) > 0, np.clip(arr, lower, upper), 0.0)
    return np.clip(arr, 0.0, None).astype(np.float32)


def heldout_mask_input_grid(
    brain: np.ndarray, affine: np.ndarray, heldout_range: Sequence[float] | None, gap_mm: float
) -> np.ndarray:
    """Voxels of the held-out slab on the input grid (all voxels when ``heldout_range`` is None)."""
    if heldout_range is None:
        return np.ones(brain.shape, dtype=bool)
    axis = axial_axis(affine)
    s = slice_s_coords(affine, brain.shape, axis)
    has_brain = brain.any(axis=tuple(i for i in range(3) if i != axis))
    spacing = float(np.linalg.norm(affine[:3, axis]))
    lo, hi, _ = heldout_slab(s[has_brain], spacing, heldout_range, gap_mm)
    sel = (s >= lo) & (s <= hi)
    shape = [1, 1, 1]
    shape[axis] = -1
    return np.broadcast_to(sel.reshape(shape), brain.shape)

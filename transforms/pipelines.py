"""Ready-made preprocessing pipelines (functions returning ``monai.transforms.Compose``) for the three data kinds.

- :func:`microscopy_pipeline`: 2D fluorescence images, one file per channel (PNG/JPEG/TIFF; RGB pseudo-colour
  collapsed to one channel by default), every key -> float32 MetaTensor ``[1, H, W]`` in [-1, 1].
- :func:`np_pipeline`: the same with the right defaults for the synthetic NP tiles (16-bit, fixed range) and the
  official DAMM layout (8-bit RGB JPEG, fixed range, like the paper's ``ToTensor`` + ``Normalize(0.5, 0.5)``).
- :func:`brats_volume_pipeline` / :func:`brats_slice_pipeline`: co-registered 3D MRI volumes -> oriented,
  brain-mask-normalised, brain-cropped volumes; and random axial 2D slices of them for training. For inference
  run the volume pipeline and iterate slices with :func:`transforms.slices.iter_slices`.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    EnsureTyped,
    Orientationd,
    RandSpatialCropd,
    Resized,
    Spacingd,
    SpatialPadd,
    ThresholdIntensityd,
)

from transforms.checks import (
    CheckCoregisteredd,
    CheckFinited,
    CheckIntegerLabelsd,
    CheckSpatialDimsd,
    WarnSaturationd,
)
from transforms.color import PseudoColorToChanneld
from transforms.intensity import RobustNormalised
from transforms.loading import LoadImageCheckedd
from transforms.masks import ForegroundUniond
from transforms.slices import RandAxialSliced
from transforms.utility import CheckedCompose, ReplaceNoned

__all__ = [
    "brats_slice_pipeline",
    "brats_volume_pipeline",
    "microscopy_pipeline",
    "np_pipeline",
]


def microscopy_pipeline(
    keys: Sequence[str],
    keep_rgb: bool = False,
    rgb_mode: str = "max",
    intensity: str = "percentile",
    lower: float = 0.5,
    upper: float = 99.5,
    value_range: tuple[float, float] | None = None,
    resize_to: Sequence[int] | int | None = None,
    crop_size: Sequence[int] | int | None = None,
    random_crop: bool = True,
    allow_constant: bool = False,
    load: bool = True,
) -> Compose:
    """2D fluorescence pipeline: load, check, one channel, same shape, normalise to [-1, 1].

    Steps: :class:`~transforms.loading.LoadImageCheckedd` (PIL for PNG/JPEG in numpy row/column order, tifffile
    for TIFF), :class:`~transforms.checks.CheckFinited`, ``CheckSpatialDimsd(2)``,
    :class:`~transforms.color.PseudoColorToChanneld`, :class:`~transforms.checks.CheckCoregisteredd` (same shape),
    optional ``Resized`` / ``RandSpatialCropd`` (or ``CenterSpatialCropd``), then
    :class:`~transforms.intensity.RobustNormalised` (parameters in ``meta['intensity_normalisation']``) and
    ``EnsureTyped(float32)``.

    Args:
        keys: modality keys (file paths in the items).
        keep_rgb: keep 3 RGB channels instead of collapsing pseudo-colour to one channel.
        rgb_mode: how RGB is collapsed (see :class:`~transforms.color.PseudoColorToChanneld`).
        intensity: ``"percentile"`` (per image) or ``"fixed"`` (``value_range`` for every image).
        lower: lower percentile.
        upper: upper percentile.
        value_range: input range for ``"fixed"``, e.g. ``(0, 255)`` for 8-bit or ``(0, 65535)`` for 16-bit.
        resize_to: resize every key to this spatial size (bilinear, as the paper's 256x256), or ``None``.
        crop_size: crop every key (the same window) to this size, or ``None``.
        random_crop: random crop window (training) instead of the centre one.
        allow_constant: accept constant images (zero intensity range) instead of raising.
        load: include the loading step (set False when items already hold channel-first arrays).

    Returns:
        The ``Compose``. Top-level ``None`` fields (JSON ``null``, e.g. ``divergence_kind``) become ``"none"`` so
        batches collate.
    """
    keys = list(keys)
    steps: list = [LoadImageCheckedd(keys)] if load else []
    steps += [
        CheckFinited(keys),
        CheckSpatialDimsd(keys, spatial_dims=2),
        PseudoColorToChanneld(keys, mode=rgb_mode, keep_rgb=keep_rgb),
        CheckCoregisteredd(keys),
    ]
    if resize_to is not None:
        steps.append(Resized(keys, spatial_size=_pair(resize_to), mode="bilinear", anti_aliasing=True))
    if crop_size is not None:
        size = _pair(crop_size)
        steps.append(SpatialPadd(keys, spatial_size=size))
        steps.append(
            RandSpatialCropd(keys, roi_size=size, random_size=False) if random_crop else CenterSpatialCropd(keys, size)
        )
    if intensity == "fixed" and value_range is not None:
        steps.append(WarnSaturationd(keys, value_range))
    steps += [
        RobustNormalised(
            keys, mode=intensity, lower=lower, upper=upper, value_range=value_range, allow_constant=allow_constant
        ),
        EnsureTyped(keys, dtype="float32", track_meta=True),
        ReplaceNoned("none"),
    ]
    return CheckedCompose(steps)


def np_pipeline(
    keys: Sequence[str],
    source: str = "synthetic",
    keep_rgb: bool = False,
    resize_to: Sequence[int] | int | None = None,
    allow_constant: bool = True,
    **kwargs,
) -> Compose:
    """Pipeline for nanoparticle tiles (the target and condition keys of the bundle's ``common.json``).

    Fixed-range normalisation keeps absolute NP intensity comparable between tiles (a per-tile percentile would
    erase the differences in dose the model has to predict).

    Args:
        keys: modality keys (no default: the data keys come from the config, ``modalities``).
        source: ``"synthetic"`` (16-bit PNG from :mod:`data_prep.synthetic_np`, range 0..65535) or ``"official"``
            (8-bit RGB JPEG of the official DAMM layout, range 0..255).
        keep_rgb: keep RGB channels (official data only makes sense with it when models are 3-channel).
        resize_to: optional resize (the paper uses 256).
        allow_constant: accept constant images (e.g. an NP tile without any signal; the bundle's setting).
        kwargs: other :func:`microscopy_pipeline` arguments (they override the defaults).

    Returns:
        The ``Compose``.

    Raises:
        ValueError: unknown source.
    """
    ranges = {"synthetic": (0.0, 65535.0), "official": (0.0, 255.0)}
    if source not in ranges:
        raise ValueError(f"np_pipeline: source must be one of {sorted(ranges)}, got {source!r}")
    options = {"intensity": "fixed", "value_range": ranges[source]}
    options.update(kwargs)
    return microscopy_pipeline(keys, keep_rgb=keep_rgb, resize_to=resize_to, allow_constant=allow_constant, **options)


def _pair(v: Sequence[int] | int) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(i) for i in v)  # type: ignore[return-value]


def brats_volume_pipeline(
    keys: Sequence[str],
    seg_key: str | None = None,
    axcodes: str | None = "RAS",
    pixdim: Sequence[float] | None = None,
    lower: float = 0.5,
    upper: float = 99.5,
    mask_key: str = "brain_mask",
    crop_foreground: bool = True,
    margin: int = 0,
    k_divisible: int = 1,
    coregistration_tol: float = 1e-3,
    load: bool = True,
) -> Compose:
    """3D MRI pipeline for skull-stripped, co-registered modalities (BraTS).

    Steps: load (nibabel), check finite, check 3D, check co-registration (shape, spacing, orientation; names
    the files), ``Orientationd(axcodes)``, optional ``Spacingd(pixdim)`` (bilinear; nearest for the seg),
    clip negative interpolation values to 0 (``ThresholdIntensityd``), brain mask = union of non-zero voxels
    (:class:`~transforms.masks.ForegroundUniond`), optional ``CropForegroundd`` to the brain (``margin``,
    ``k_divisible``), then brain-mask percentile normalisation to [-1, 1] (background -> -1) and float32.

    Args:
        keys: image modalities.
        seg_key: optional label key (loaded, checked, resampled with nearest, cropped; not normalised).
        axcodes: target orientation (``None`` keeps the stored one).
        pixdim: target spacing in mm (``None`` keeps the stored one).
        lower: lower percentile inside the brain.
        upper: upper percentile inside the brain.
        mask_key: key of the brain mask added to the item.
        crop_foreground: crop all keys to the brain's bounding box.
        margin: margin (voxels) around the brain when cropping.
        k_divisible: make the cropped size divisible by this (e.g. the autoencoder's downsampling factor).
        coregistration_tol: tolerance on spacing and direction cosines for the co-registration check.
        load: include the loading step.

    Returns:
        The ``Compose``.
    """
    keys = list(keys)
    all_keys = keys + ([seg_key] if seg_key else [])
    steps: list = [LoadImageCheckedd(all_keys)] if load else []
    steps += [
        CheckFinited(all_keys),
        *([CheckIntegerLabelsd(seg_key)] if seg_key else []),
        CheckSpatialDimsd(all_keys, spatial_dims=3),
        CheckCoregisteredd(all_keys, spacing_tol=coregistration_tol, direction_tol=coregistration_tol),
    ]
    if axcodes:
        steps.append(Orientationd(all_keys, axcodes=axcodes, labels=None))
    if pixdim is not None:
        modes = ["bilinear"] * len(keys) + (["nearest"] if seg_key else [])
        steps.append(Spacingd(all_keys, pixdim=tuple(pixdim), mode=modes))
    steps += [
        ThresholdIntensityd(keys, threshold=0.0, above=True, cval=0.0),
        ForegroundUniond(keys, mask_key=mask_key, threshold=0.0),
    ]
    if crop_foreground:
        steps.append(
            CropForegroundd(
                [*all_keys, mask_key], source_key=mask_key, margin=margin, allow_smaller=True, k_divisible=k_divisible
            )
        )
    steps += [
        RobustNormalised(keys, mode="percentile", lower=lower, upper=upper, mask_key=mask_key),
        EnsureTyped(keys, dtype="float32", track_meta=True),
        ReplaceNoned("none"),
    ]
    return CheckedCompose(steps)


def brats_slice_pipeline(
    keys: Sequence[str],
    seg_key: str | None = None,
    spatial_size: Sequence[int] | int | None = None,
    min_foreground: float = 0.1,
    num_samples: int = 1,
    mask_key: str = "brain_mask",
    **volume_kwargs,
) -> Compose:
    """Training pipeline: the volume pipeline, then random axial 2D slices with enough brain.

    Args:
        keys: image modalities.
        seg_key: optional label key (sliced too).
        spatial_size: pad/crop every slice to this in-plane size (``None``: keep the cropped size, which varies
            between subjects; give a size to batch several subjects). Padding uses -1 (background).
        min_foreground: minimum brain fraction of a sampled slice.
        num_samples: slices drawn per volume (the pipeline returns a list of items).
        mask_key: brain mask key.
        volume_kwargs: arguments of :func:`brats_volume_pipeline`.

    Returns:
        The ``Compose``; calling it returns a list of ``num_samples`` items with ``[1, X, Y]`` images.
    """
    keys = list(keys)
    volume = brats_volume_pipeline(keys, seg_key=seg_key, mask_key=mask_key, **volume_kwargs)
    slice_keys = keys + ([seg_key] if seg_key else [])
    steps: list = [
        *volume.transforms,
        RandAxialSliced(slice_keys, foreground_key=mask_key, min_foreground=min_foreground, num_samples=num_samples),
    ]
    if spatial_size is not None:
        size = _pair(spatial_size)
        steps.append(SpatialPadd(keys, spatial_size=size, value=-1.0))
        steps.append(SpatialPadd([*([seg_key] if seg_key else []), mask_key], spatial_size=size))
        steps.append(CenterSpatialCropd([*slice_keys, mask_key], roi_size=size))
    return CheckedCompose(steps)

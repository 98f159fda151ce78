"""Content checks shared by every entry point: real, finite intensities, integer labels, saturation of fixed ranges.

Header checks (existence, dimensions, grids) catch wrong files; these catch wrong *values*, which would
otherwise pass silently through training and evaluation: a complex-valued NIfTI cast to float (the imaginary
part dropped), NaN/Inf voxels, a segmentation stored as floats (tumour metrics of a float mask), a float image
whose values lie far outside the fixed intensity range it is mapped from (clipped without a word). Each raises
:class:`ContentError` (a ``ValueError``) with one line naming the file or key and what was expected.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SATURATION_WARN_FRACTION",
    "ContentError",
    "check_finite",
    "check_integer_labels",
    "check_real_file",
    "file_dtype",
    "warn_saturation",
]

logger = logging.getLogger(__name__)

#: A fixed intensity range that clips more than this fraction of an image's voxels gets a warning.
SATURATION_WARN_FRACTION = 0.01


class ContentError(ValueError):
    """An input file or array whose values are not what the project expects."""


def _array(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def file_dtype(path: str | os.PathLike) -> np.dtype | None:
    """The stored data type of an image file, read from its header only (NIfTI, TIFF); ``None`` otherwise.

    Args:
        path: an image file.

    Returns:
        The dtype, or ``None`` when the format is not one of these or the header cannot be read.
    """
    name = str(path).lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            return np.dtype(nib.load(os.fspath(path)).get_data_dtype())
        if name.endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(os.fspath(path)) as tif:
                return np.dtype(tif.series[0].dtype) if tif.series else None
    except Exception:  # unreadable headers are reported by the reader itself
        return None
    return None


def check_real_file(path: str | os.PathLike, name: str = "image") -> None:
    """Raise unless the file stores real (not complex) values.

    Args:
        path: the image file.
        name: what the file is (datalist key, argument), for the message.

    Raises:
        ContentError: complex-valued data.
    """
    dtype = file_dtype(path)
    if dtype is not None and dtype.kind == "c":
        raise ContentError(
            f"{name}: {Path(path)} holds complex-valued data ({dtype}); expected real intensities "
            "(store the magnitude, e.g. abs(), as a real image)"
        )


def check_finite(x: Any, name: str = "image", source: str = "") -> None:
    """Raise if a floating-point array holds NaN or Inf, or if it is complex.

    Args:
        x: the array (tensor, numpy array or MetaTensor).
        name: what it is (key), for the message.
        source: where it comes from (file), for the message.

    Raises:
        ContentError: non-finite or complex values.
    """
    t = _array(x)
    where = f"{name} ({source})" if source else name
    if t.is_complex():
        raise ContentError(f"{where}: complex-valued data ({t.dtype}); expected real intensities")
    if t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            n_nan = int(torch.isnan(t).sum())
            raise ContentError(
                f"{where}: {bad} non-finite values ({n_nan} NaN, {bad - n_nan} Inf) of {t.numel()}; "
                "expected finite intensities"
            )


def check_integer_labels(x: Any, name: str = "label", source: str = "", max_labels: int = 256) -> None:
    """Raise unless an array is a label map: finite, non-negative integer values, at most ``max_labels`` of them.

    Args:
        x: the label array (float storage is fine when every value is integral).
        name: what it is (key), for the message.
        source: where it comes from (file), for the message.
        max_labels: most distinct labels accepted (a continuous image passed as labels has thousands).

    Raises:
        ContentError: non-integer, negative, non-finite values or too many distinct labels.
    """
    t = _array(x)
    where = f"{name} ({source})" if source else name
    if t.is_complex():
        raise ContentError(f"{where}: complex-valued data; expected an integer label map")
    if t.is_floating_point():
        check_finite(t, name, source)
        frac = t != torch.round(t)
        if bool(frac.any()):
            example = float(t[frac].flatten()[0])
            raise ContentError(
                f"{where}: not an integer label map: {int(frac.sum())} non-integer values (e.g. {example:g}); "
                "expected integer labels (a segmentation, not an image or an interpolated mask)"
            )
    if t.numel() and float(t.min()) < 0:
        raise ContentError(f"{where}: negative label {float(t.min()):g}; expected labels >= 0")
    n = int(torch.unique(t).numel()) if t.numel() else 0
    if n > max_labels:
        raise ContentError(f"{where}: {n} distinct values; expected an integer label map of at most {max_labels}")


def warn_saturation(
    x: Any,
    lower: float,
    upper: float,
    name: str = "image",
    source: str = "",
    max_fraction: float = SATURATION_WARN_FRACTION,
) -> float:
    """Warn when more than ``max_fraction`` of the values lie outside the fixed range ``[lower, upper]``.

    Args:
        x: the array (before the range is applied).
        lower: low end of the fixed range.
        upper: high end of the fixed range.
        name: what it is (key), for the message.
        source: where it comes from (file), for the message.
        max_fraction: the fraction above which a warning is given.

    Returns:
        The fraction of values outside the range.
    """
    t = _array(x)
    if not t.numel():
        return 0.0
    t = t.float() if not t.is_floating_point() else t
    fraction = float(((t < lower) | (t > upper)).float().mean())
    if fraction > max_fraction:
        where = f"{name} ({source})" if source else name
        message = (
            f"{where}: {100 * fraction:.1f} % of the values lie outside the fixed intensity range "
            f"[{lower:g}, {upper:g}] (values {float(t.min()):g}..{float(t.max()):g}) and are clipped; expected "
            f"at most {100 * max_fraction:g} %: check the data's scale or use percentile normalisation"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
    return fraction

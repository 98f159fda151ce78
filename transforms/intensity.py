"""Robust per-modality intensity normalisation to [-1, 1] that records its parameters, and its inverse.

The forward map is linear: ``y = out_min + (x - lower) / (upper - lower) * (out_max - out_min)`` (then clipped to
``[out_min, out_max]`` by default). ``lower``/``upper`` are either percentiles of the image (optionally inside
a foreground mask, e.g. the brain for MRI) or a fixed value range (e.g. ``(0, 65535)`` for 16-bit data, which
keeps absolute intensities comparable between images). The parameters are stored in the image's metadata under
:data:`NORM_META_KEY` and in its applied-operations stack, so a prediction can be mapped back with
:func:`denormalise` (also batched, after MONAI collation) or with ``monai.transforms.Invertd``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import TraceKeys

from transforms.loading import source_name

__all__ = [
    "INTENSITY_SOURCES",
    "NORMALISATION_MODES",
    "NORM_META_KEY",
    "CheckIntensityMappingd",
    "RobustNormalised",
    "denormalise",
    "file_dtype",
    "normalise",
    "robust_range",
    "source_mode",
    "source_range",
]

NORM_META_KEY = "intensity_normalisation"
NORMALISATION_MODES = ("percentile", "fixed")
#: Named input intensity ranges (``intensity_source``): the bundle's synthetic 16-bit tiles, any 16-bit or 8-bit
#: data, the official DAMM 8-bit JPEGs. ``"dtype"`` (the range of the files' integer dtype) and ``"percentile"``
#: (per image) are resolved by :func:`source_mode` / :func:`source_range`; a ``[lower, upper]`` pair is used as is.
INTENSITY_SOURCES = {
    "synthetic": (0.0, 65535.0),
    "uint16": (0.0, 65535.0),
    "official": (0.0, 255.0),
    "uint8": (0.0, 255.0),
}


def robust_range(
    x: torch.Tensor | np.ndarray, lower: float = 0.5, upper: float = 99.5, mask: Any = None
) -> tuple[float, float]:
    """Percentile range of ``x`` (inside ``mask`` if given); falls back to min/max if the percentiles coincide.

    Args:
        x: image.
        lower: lower percentile in [0, 100).
        upper: upper percentile in (lower, 100].
        mask: optional boolean mask broadcastable to ``x`` (voxels to use).

    Returns:
        ``(lo, hi)`` as floats; ``lo == hi`` only for a constant image (or masked region).

    Raises:
        ValueError: the mask selects no voxel.
    """
    v = torch.as_tensor(x).detach().reshape(-1) if mask is None else _masked(x, mask)
    if v.numel() == 0:
        raise ValueError("the foreground mask selects no voxel")
    v = v.to(torch.float64)
    q = torch.quantile(
        v if v.numel() <= 8_000_000 else v[:: v.numel() // 4_000_000 + 1],
        torch.tensor([lower, upper], dtype=torch.float64) / 100,
    )
    lo, hi = float(q[0]), float(q[1])
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        lo, hi = float(v.min()), float(v.max())
    return lo, hi


def _masked(x: Any, mask: Any) -> torch.Tensor:
    xt = torch.as_tensor(x).detach()
    m = torch.as_tensor(mask).detach() > 0
    m = m.expand_as(xt) if m.shape != xt.shape else m
    return xt[m]


def normalise(
    x: torch.Tensor, lower: float, upper: float, out_min: float = -1.0, out_max: float = 1.0, clip: bool = True
) -> torch.Tensor:
    """Map ``[lower, upper]`` linearly to ``[out_min, out_max]`` (optionally clipping).

    Args:
        x: image.
        lower: input value mapped to ``out_min``.
        upper: input value mapped to ``out_max`` (must differ from ``lower``).
        out_min: output minimum.
        out_max: output maximum.
        clip: clip the result to ``[out_min, out_max]``.

    Returns:
        The normalised image (float).
    """
    y = (x - lower) / (upper - lower) * (out_max - out_min) + out_min
    return y.clamp(out_min, out_max) if clip else y


def _as_batched(v: Any, like: torch.Tensor) -> Any:
    """Reshape per-sample parameters ``[B]`` to broadcast against ``like`` ``[B, ...]``."""
    if torch.is_tensor(v) or isinstance(v, (list, tuple, np.ndarray)):
        t = torch.as_tensor(v, dtype=torch.float64 if not torch.is_tensor(like) else like.dtype)
        t = t.to(like.device) if torch.is_tensor(like) else t
        if t.ndim == 0:
            return t
        return t.reshape(-1, *([1] * (like.ndim - 1)))
    return float(v)


def denormalise(x: torch.Tensor | np.ndarray, params: Mapping[str, Any] | MetaTensor) -> torch.Tensor | np.ndarray:
    """Map a normalised image (or prediction) back to the input intensity scale.

    Args:
        x: normalised image ``[C, ...]`` or batch ``[B, C, ...]``.
        params: the recorded parameters (``meta[NORM_META_KEY]``, possibly collated to tensors of shape ``[B]``),
            or a MetaTensor whose metadata holds them.

    Returns:
        ``lower + (x - out_min) / (out_max - out_min) * (upper - lower)``, same type as ``x``. Values clipped by
        the forward map are not recovered (they map to ``lower``/``upper``).

    Raises:
        KeyError: the parameters are missing.
    """
    if isinstance(params, MetaTensor):
        params = params.meta
    if NORM_META_KEY in params:
        params = params[NORM_META_KEY]
    try:
        lower, upper, out_min, out_max = (params[k] for k in ("lower", "upper", "out_min", "out_max"))
    except KeyError as err:
        raise KeyError(f"normalisation parameters lack {err}; expected keys lower, upper, out_min, out_max") from err
    lower, upper, out_min, out_max = (_as_batched(v, torch.as_tensor(x)) for v in (lower, upper, out_min, out_max))
    if isinstance(x, np.ndarray):
        y = lower + (torch.as_tensor(x) - out_min) / (out_max - out_min) * (upper - lower)
        return np.asarray(y, dtype=x.dtype)
    return lower + (x - out_min) / (out_max - out_min) * (upper - lower)


class RobustNormalised(MapTransform, InvertibleTransform):
    """Per-modality robust normalisation to ``[out_min, out_max]`` (default [-1, 1]), invertible.

    Args:
        keys: modalities to normalise (each gets its own parameters).
        mode: ``"percentile"`` (per image, robust) or ``"fixed"`` (use ``value_range`` for every image).
        lower: lower percentile (``"percentile"`` mode).
        upper: upper percentile (``"percentile"`` mode).
        value_range: ``(lower, upper)`` input values for ``"fixed"`` mode, e.g. ``(0, 65535)``.
        mask_key: key of a foreground mask (e.g. the brain); percentiles are taken inside it.
        nonzero: take percentiles over non-zero voxels only (when no mask key is given).
        clip: clip the output to ``[out_min, out_max]``.
        out_min: output minimum.
        out_max: output maximum.
        allow_constant: accept an image with zero intensity range (it maps to ``out_min``) instead of raising.
        allow_missing_keys: skip keys absent from the item.

    Raises:
        ValueError: invalid settings.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "percentile",
        lower: float = 0.5,
        upper: float = 99.5,
        value_range: tuple[float, float] | None = None,
        mask_key: str | None = None,
        nonzero: bool = False,
        clip: bool = True,
        out_min: float = -1.0,
        out_max: float = 1.0,
        allow_constant: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in NORMALISATION_MODES:
            raise ValueError(f"RobustNormalised: mode must be one of {NORMALISATION_MODES}, got {mode!r}")
        if mode == "fixed" and (value_range is None or len(value_range) != 2 or value_range[1] <= value_range[0]):
            raise ValueError(
                f"RobustNormalised: mode 'fixed' needs value_range=(low, high) with high > low, got {value_range!r}"
            )
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"RobustNormalised: need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        if out_max <= out_min:
            raise ValueError(f"RobustNormalised: need out_max > out_min, got {out_min}, {out_max}")
        self.mode = mode
        self.lower, self.upper = float(lower), float(upper)
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self.mask_key = mask_key
        self.nonzero = nonzero
        self.clip = clip
        self.out_min, self.out_max = float(out_min), float(out_max)
        self.allow_constant = allow_constant

    def _params(self, key: Hashable, x: torch.Tensor, mask: Any) -> dict[str, Any]:
        xt = torch.as_tensor(x)
        vmin, vmax = float(xt.min()), float(xt.max())
        if vmax - vmin <= 0 and not self.allow_constant:
            raise ValueError(
                f"modality {key!r} ({source_name(x)}): constant image (every value is {vmin:g}); "
                "expected a non-zero intensity range"
            )
        if self.mode == "fixed":
            lo, hi = self.value_range
        else:
            if mask is None and self.nonzero:
                mask = xt != 0
            try:
                lo, hi = robust_range(xt, self.lower, self.upper, mask)
            except ValueError as err:
                raise ValueError(f"modality {key!r} ({source_name(x)}): {err} (mask key {self.mask_key!r})") from err
            if hi - lo <= 0:
                if not self.allow_constant:
                    raise ValueError(
                        f"modality {key!r} ({source_name(x)}): zero intensity range inside the foreground "
                        f"(value {lo:g}); expected a non-constant image"
                    )
                hi = lo + 1.0
        return {
            "mode": self.mode,
            "lower": float(lo),
            "upper": float(hi),
            "out_min": self.out_min,
            "out_max": self.out_max,
            "clip": self.clip,
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise every key and record its parameters.

        Args:
            data: item dict.

        Returns:
            A new dict.

        Raises:
            ValueError: constant image, empty mask.
        """
        d = dict(data)
        mask = None
        if self.mask_key is not None:
            if self.mask_key not in d:
                raise ValueError(
                    f"RobustNormalised: mask key {self.mask_key!r} not in the item (keys {sorted(map(str, d))})"
                )
            mask = d[self.mask_key]
        for key in self.key_iterator(d):
            x = d[key]
            params = self._params(key, x, mask)
            x = x if isinstance(x, MetaTensor) else MetaTensor(torch.as_tensor(x))
            y = normalise(x.float(), params["lower"], params["upper"], self.out_min, self.out_max, self.clip)
            if isinstance(y, MetaTensor):
                y.meta[NORM_META_KEY] = dict(params)
            d[key] = y
            self.push_transform(d, key, extra_info=params)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Map every key back to its input intensity scale (uses the recorded parameters).

        Args:
            data: item dict produced by this transform (or a prediction carrying its applied operations).

        Returns:
            A new dict.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            xform = self.pop_transform(d, key)
            d[key] = denormalise(d[key], xform[TraceKeys.EXTRA_INFO])
            if isinstance(d[key], MetaTensor):
                d[key].meta.pop(NORM_META_KEY, None)
        return d


def file_dtype(path: str | Path) -> np.dtype | None:
    """The stored sample dtype of an image file, read from its header (PNG/JPEG via PIL, TIFF via tifffile).

    Args:
        path: image file.

    Returns:
        The dtype, or ``None`` for other formats or unreadable headers.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-1:]).lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return np.dtype(tif.pages[0].dtype)
        if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
            from PIL import Image

            with Image.open(path) as img:
                mode = img.mode
            if mode.startswith("I;16"):
                return np.dtype(np.uint16)
            if mode in ("1", "L", "P", "RGB", "RGBA", "LA"):
                return np.dtype(np.uint8)
            if mode == "I":
                return np.dtype(np.int32)
            if mode == "F":
                return np.dtype(np.float32)
    except (OSError, ValueError):
        return None
    return None


def source_mode(intensity_source: str | Sequence[float]) -> str:
    """The :class:`RobustNormalised` mode of an ``intensity_source`` setting.

    Args:
        intensity_source: a name of :data:`INTENSITY_SOURCES`, ``"dtype"``, ``"percentile"`` or ``[lower, upper]``.

    Returns:
        ``"percentile"`` or ``"fixed"``.
    """
    return "percentile" if intensity_source == "percentile" else "fixed"


def source_range(
    intensity_source: str | Sequence[float], items: Sequence[Mapping[str, Any]] = (), keys: Sequence[str] = ()
) -> tuple[float, float] | None:
    """The fixed input range of an ``intensity_source`` setting.

    Args:
        intensity_source: a name of :data:`INTENSITY_SOURCES`, ``"dtype"`` (the range of the integer dtype of the
            items' files, which must agree), ``"percentile"`` (no fixed range) or ``[lower, upper]``.
        items: the datalist items (``"dtype"`` only).
        keys: the image keys of the items (``"dtype"`` only; default: every string value that is a file).

    Returns:
        ``(lower, upper)``, or ``None`` for ``"percentile"``.

    Raises:
        ValueError: an unknown setting, a bad pair, or ``"dtype"`` with float / unknown / mixed file dtypes.
    """
    if isinstance(intensity_source, str):
        if intensity_source == "percentile":
            return None
        if intensity_source in INTENSITY_SOURCES:
            return INTENSITY_SOURCES[intensity_source]
        if intensity_source != "dtype":
            names = [*INTENSITY_SOURCES, "dtype", "percentile"]
            raise ValueError(f"intensity_source must be one of {names} or [lower, upper], got {intensity_source!r}")
        dtypes = {}
        for item in items:
            for key, value in item.items():
                if (keys and key not in keys) or not isinstance(value, (str, Path)) or not Path(value).is_file():
                    continue
                dtypes[str(value)] = file_dtype(value)
        kinds = {str(d) for d in dtypes.values()}
        if not dtypes or len(kinds) != 1 or None in dtypes.values():
            raise ValueError(
                f"intensity_source='dtype' needs files of one integer dtype, found {sorted(kinds) or 'no file'}; "
                "set intensity_source to 'uint8', 'uint16', 'percentile' or [lower, upper]"
            )
        dtype = next(iter(dtypes.values()))
        if not np.issubdtype(dtype, np.integer):
            raise ValueError(
                f"intensity_source='dtype': the files are {dtype} (no natural range); set intensity_source to "
                "'percentile' or [lower, upper]"
            )
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    pair = [float(v) for v in intensity_source]
    if len(pair) != 2 or pair[1] <= pair[0]:
        raise ValueError(f"intensity_source=[lower, upper] needs upper > lower, got {list(intensity_source)}")
    return pair[0], pair[1]


class CheckIntensityMappingd(MapTransform):
    """Refuse an intensity mapping that saturates the inputs (after :class:`RobustNormalised`).

    With a fixed range, an input whose *file dtype* cannot reach more than ``min_span`` of the range (8-bit tiles
    through the 16-bit range land in ``[-1, -0.992]``) or whose values exceed the range's top (clipped to the
    output maximum) for more than ``max_clipped`` of the pixels carries no usable signal: the network sees a flat
    image and silently predicts nonsense. Both raise ``ValueError`` naming the setting to change.

    Args:
        keys: normalised image keys (``meta['intensity_normalisation']`` and ``meta['filename_or_obj']`` are read).
        setting: the config setting named in the error (``intensity_source``).
        min_span: smallest usable share of the output range that the file's dtype may reach.
        max_clipped: largest share of pixels clipped at the top of the output range (constant images excepted; a
            dark background at the bottom is not clipping).
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(
        self,
        keys: KeysCollection,
        setting: str = "intensity_source",
        min_span: float = 0.05,
        max_clipped: float = 0.1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.setting, self.min_span, self.max_clipped = setting, float(min_span), float(max_clipped)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Check the keys; return the item unchanged.

        Args:
            data: item dict of normalised images.

        Returns:
            A shallow copy of ``data``.

        Raises:
            ValueError: a saturating mapping (names the key, the file, the range and the setting).
        """
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            params = getattr(x, "meta", {}).get(NORM_META_KEY)
            if not params or params.get("mode") != "fixed":
                continue
            lo, hi, out_min, out_max = (float(params[k]) for k in ("lower", "upper", "out_min", "out_max"))
            where = f"modality {key!r} ({source_name(x)})"
            hint = (
                f"set {self.setting} to match the data: 'uint8' (0..255), 'uint16' (0..65535), 'dtype' (the files' "
                "integer range), 'percentile' (per image) or [lower, upper]"
            )
            path = source_name(x)
            dtype = file_dtype(path) if Path(path).is_file() else None
            if dtype is not None and np.issubdtype(dtype, np.integer):
                top = float(np.iinfo(dtype).max)
                reach = (min(top, hi) - lo) / (hi - lo)
                if reach < self.min_span:
                    mapped = out_min + max(reach, 0.0) * (out_max - out_min)
                    raise ValueError(
                        f"{where}: the {dtype} file can reach only {100 * max(reach, 0.0):.2f} % of the fixed input "
                        f"range [{lo:g}, {hi:g}]: every value lands in [{out_min:g}, {mapped:.4f}] and the model "
                        f"would see a flat image; {hint}"
                    )
            t = torch.as_tensor(x).float()
            if t.numel() and float(t.max() - t.min()) > 0:
                clipped = float((t >= out_max).float().mean())
                if clipped > self.max_clipped:
                    raise ValueError(
                        f"{where}: {100 * clipped:.1f} % of the pixels are clipped by the fixed input range "
                        f"[{lo:g}, {hi:g}] (saturated); {hint}"
                    )
        return d

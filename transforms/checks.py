"""Input checks that fail early with the key and the file: finiteness, dimensionality, co-registration.

:func:`check_coregistered` is the project's one co-registration rule (same shape, and, where the images carry an
affine, the same spacing and orientation, optionally origin). :class:`CheckCoregisteredd` applies it to loaded
MetaTensors; the header-only pre-checks of the tasks and converters apply it to geometries read from file headers
(:func:`geometry_from_affine`), so every path reports a mismatch with the same message.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ddcore.content import SATURATION_WARN_FRACTION, check_finite, check_integer_labels, warn_saturation
from transforms.loading import source_name

__all__ = [
    "CheckCoregisteredd",
    "CheckFinited",
    "CheckIntegerLabelsd",
    "CheckSpatialDimsd",
    "WarnSaturationd",
    "affine_of",
    "check_coregistered",
    "describe_geometry",
    "geometry_from_affine",
]


class CheckFinited(MapTransform):
    """Raise ``ValueError`` if an image holds NaN or Inf values (names key, file and count).

    Args:
        keys: keys to check.
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Check the keys; return the item unchanged.

        Args:
            data: item dict.

        Returns:
            A shallow copy of ``data``.

        Raises:
            ValueError: non-finite values found.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            check_finite(d[key], f"modality {key!r}", source_name(d[key]))
        return d


class CheckIntegerLabelsd(MapTransform):
    """Raise ``ValueError`` unless a key holds an integer label map (see :func:`ddcore.content.check_integer_labels`).

    Args:
        keys: label keys (segmentations).
        max_labels: most distinct labels accepted.
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(self, keys: KeysCollection, max_labels: int = 256, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_labels = int(max_labels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Check the keys; return the item unchanged.

        Args:
            data: item dict.

        Returns:
            A shallow copy of ``data``.

        Raises:
            ValueError: non-integer, negative or non-finite labels.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            check_integer_labels(d[key], f"label {key!r}", source_name(d[key]), self.max_labels)
        return d


class WarnSaturationd(MapTransform):
    """Warn when a fixed intensity range clips more than ``max_fraction`` of an image's values.

    Args:
        keys: keys to check (before the range is applied).
        value_range: the fixed ``(lower, upper)`` range.
        max_fraction: fraction of clipped values above which a warning names the key and file (1 %).
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(
        self,
        keys: KeysCollection,
        value_range: Sequence[float],
        max_fraction: float = SATURATION_WARN_FRACTION,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lower, self.upper = (float(v) for v in value_range)
        self.max_fraction = float(max_fraction)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Check the keys; return the item unchanged.

        Args:
            data: item dict.

        Returns:
            A shallow copy of ``data``.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            warn_saturation(d[key], self.lower, self.upper, f"modality {key!r}", source_name(d[key]), self.max_fraction)
        return d


class CheckSpatialDimsd(MapTransform):
    """Raise ``ValueError`` unless every image (channel first) has ``spatial_dims`` spatial dimensions.

    Args:
        keys: keys to check.
        spatial_dims: expected number of spatial dimensions (2 for tiles and slices, 3 for volumes).
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Check the keys; return the item unchanged.

        Args:
            data: item dict (images channel first).

        Returns:
            A shallow copy of ``data``.

        Raises:
            ValueError: wrong number of spatial dimensions.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape)
            got = len(shape) - 1
            if got != self.spatial_dims:
                what = "2D image" if self.spatial_dims == 2 else "3D volume"
                raise ValueError(
                    f"modality {key!r} ({source_name(d[key])}): expected a {what} ({self.spatial_dims} spatial "
                    f"dimensions after the channel), got {got}D data of shape {shape}"
                )
        return d


def affine_of(x: Any) -> np.ndarray:
    """The image's affine as a float64 numpy array (identity when it carries none).

    Args:
        x: a MetaTensor or array (channel first).

    Returns:
        ``(s+1, s+1)`` matrix for ``s`` spatial dimensions.
    """
    n = x.ndim - 1
    if isinstance(x, MetaTensor):
        aff = np.asarray(x.affine.detach().cpu().numpy() if torch.is_tensor(x.affine) else x.affine, dtype=np.float64)
        if aff.shape == (n + 1, n + 1):
            return aff
        if aff.shape[0] > n + 1:  # e.g. 2D image with a 4x4 affine: keep the in-plane part
            out = np.eye(n + 1)
            out[:n, :n] = aff[:n, :n]
            out[:n, n] = aff[:n, -1]
            return out
    return np.eye(n + 1)


def geometry_from_affine(shape: Sequence[int], affine: Any = None) -> dict[str, Any]:
    """Shape, spacing, direction cosines and origin from a spatial shape and an affine.

    Args:
        shape: spatial shape (no channel).
        affine: ``(s+1, s+1)`` matrix, or ``None`` for images without geometry (e.g. TIFF/PNG tiles), whose
            co-registration is then judged on the shape alone.

    Returns:
        Dict with ``shape`` (tuple of ints) and ``spacing``, ``direction`` (unit column vectors), ``origin``
        (``None`` each when ``affine`` is ``None``).
    """
    shape = tuple(int(s) for s in shape)
    if affine is None:
        return {"shape": shape, "spacing": None, "direction": None, "origin": None}
    aff = np.asarray(affine, dtype=np.float64)
    n = aff.shape[0] - 1
    spacing = np.linalg.norm(aff[:n, :n], axis=0)
    direction = aff[:n, :n] / np.where(spacing > 0, spacing, 1.0)
    return {"shape": shape, "spacing": spacing, "direction": direction, "origin": aff[:n, n]}


def describe_geometry(x: Any) -> dict[str, Any]:
    """Shape, spacing, orientation codes and origin of an image (for messages and checks).

    Args:
        x: a MetaTensor or array (channel first).

    Returns:
        Dict with ``shape``, ``spacing``, ``direction`` (unit column vectors), ``origin``.
    """
    return geometry_from_affine(x.shape[1:], affine_of(x))


def check_coregistered(
    geometries: Mapping[str, Mapping[str, Any]],
    names: Mapping[str, str] | None = None,
    spacing_tol: float = 1e-3,
    direction_tol: float = 1e-3,
    origin_tol: float | None = None,
    what: str = "modalities",
) -> None:
    """Raise ``ValueError`` unless every geometry matches the first one (the project's co-registration rule).

    Shapes must be equal; where both geometries carry an affine (:func:`geometry_from_affine`), spacing and
    direction cosines must agree within the tolerances, and the origin too when ``origin_tol`` is given.

    Args:
        geometries: ``{key: geometry}`` (first entry is the reference), from :func:`describe_geometry` or
            :func:`geometry_from_affine`.
        names: ``{key: file name}`` for the message (default: the keys).
        spacing_tol: absolute tolerance on voxel spacing (affine units, usually mm).
        direction_tol: absolute tolerance on the direction cosines.
        origin_tol: absolute tolerance on the origin; ``None`` skips the origin check.
        what: what the keys are, for the message (``"modalities"``, ``"channels"``).

    Raises:
        ValueError: a mismatch; the message names the mismatching keys, each problem, and every key's file,
            shape and spacing, e.g. ``modalities ['t2'] are not on the grid of 't1', i.e. not co-registered:
            spacing of 't2' [1.0, 1.0, 2.0] != [1.0, 1.0, 1.0] of 't1'. Files: t1: t1.nii.gz shape=(6, 5, 4)
            spacing=[1.0, 1.0, 1.0]; t2: ...``.
    """
    keys = list(geometries)
    if len(keys) < 2:
        return
    ref, r = keys[0], geometries[keys[0]]
    problems, bad = [], []
    for k in keys[1:]:
        g = geometries[k]
        found = []
        if tuple(g["shape"]) != tuple(r["shape"]):
            found.append(f"shape of {k!r} {tuple(g['shape'])} != {tuple(r['shape'])} of {ref!r}")
        elif g["spacing"] is not None and r["spacing"] is not None:
            if not np.allclose(g["spacing"], r["spacing"], atol=spacing_tol, rtol=0):
                found.append(
                    f"spacing of {k!r} {np.round(g['spacing'], 4).tolist()} != "
                    f"{np.round(r['spacing'], 4).tolist()} of {ref!r}"
                )
            if not np.allclose(g["direction"], r["direction"], atol=direction_tol, rtol=0):
                found.append(f"orientation of {k!r} differs from {ref!r}")
            if origin_tol is not None and not np.allclose(g["origin"], r["origin"], atol=origin_tol, rtol=0):
                found.append(
                    f"origin of {k!r} {np.round(g['origin'], 2).tolist()} != {np.round(r['origin'], 2).tolist()} "
                    f"of {ref!r}"
                )
        if found:
            bad.append(k)
            problems += found
    if problems:
        names = dict(names or {})

        def _desc(k: str) -> str:
            g = geometries[k]
            spacing = "" if g["spacing"] is None else f" spacing={np.round(g['spacing'], 4).tolist()}"
            return f"{k}: {names.get(k, k)} shape={tuple(g['shape'])}{spacing}"

        raise ValueError(
            f"{what} {bad} are not on the grid of {ref!r}, i.e. not co-registered: {'; '.join(problems)}. "
            f"Files: {'; '.join(_desc(k) for k in keys)}"
        )


class CheckCoregisteredd(MapTransform):
    """Raise ``ValueError`` unless all keys share spatial shape, spacing and orientation (within tolerance).

    Run it right after loading (before any resampling), so the message names the files as stored.

    Args:
        keys: the modalities of one sample.
        spacing_tol: absolute tolerance on voxel spacing (same unit as the affine, usually mm).
        direction_tol: absolute tolerance on the direction cosines.
        origin_tol: absolute tolerance on the origin; ``None`` skips the origin check.
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spacing_tol: float = 1e-3,
        direction_tol: float = 1e-3,
        origin_tol: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spacing_tol = spacing_tol
        self.direction_tol = direction_tol
        self.origin_tol = origin_tol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Compare every key with the first one.

        Args:
            data: item dict (images channel first).

        Returns:
            A shallow copy of ``data``.

        Raises:
            ValueError: a mismatch; the message lists every key with its file and geometry.
        """
        d = dict(data)
        keys = list(self.key_iterator(d))
        check_coregistered(
            {k: describe_geometry(d[k]) for k in keys},
            {k: source_name(d[k]) for k in keys},
            self.spacing_tol,
            self.direction_tol,
            self.origin_tol,
        )
        return d

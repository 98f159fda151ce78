"""Input checks that fail early with the key and the file: finiteness, dimensionality, co-registration."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from transforms.loading import source_name

__all__ = ["CheckCoregisteredd", "CheckFinited", "CheckSpatialDimsd", "affine_of", "describe_geometry"]


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
            x = torch.as_tensor(d[key])
            if x.is_floating_point():
                bad = int((~torch.isfinite(x)).sum())
                if bad:
                    n_nan = int(torch.isnan(x).sum())
                    raise ValueError(
                        f"modality {key!r} ({source_name(d[key])}): {bad} non-finite values "
                        f"({n_nan} NaN, {bad - n_nan} Inf); expected finite intensities"
                    )
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


def describe_geometry(x: Any) -> dict[str, Any]:
    """Shape, spacing, orientation codes and origin of an image (for messages and checks).

    Args:
        x: a MetaTensor or array (channel first).

    Returns:
        Dict with ``shape``, ``spacing``, ``direction`` (unit column vectors), ``origin``.
    """
    aff = affine_of(x)
    n = aff.shape[0] - 1
    spacing = np.linalg.norm(aff[:n, :n], axis=0)
    direction = aff[:n, :n] / np.where(spacing > 0, spacing, 1.0)
    return {
        "shape": tuple(int(s) for s in x.shape[1:]),
        "spacing": spacing,
        "direction": direction,
        "origin": aff[:n, n],
    }


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
        if len(keys) < 2:
            return d
        geo = {k: describe_geometry(d[k]) for k in keys}
        ref = keys[0]
        problems = []
        for k in keys[1:]:
            g, r = geo[k], geo[ref]
            if g["shape"] != r["shape"]:
                problems.append(f"shape of {k!r} {g['shape']} != {r['shape']} of {ref!r}")
                continue
            if not np.allclose(g["spacing"], r["spacing"], atol=self.spacing_tol, rtol=0):
                problems.append(
                    f"spacing of {k!r} {np.round(g['spacing'], 4).tolist()} != "
                    f"{np.round(r['spacing'], 4).tolist()} of {ref!r}"
                )
            if not np.allclose(g["direction"], r["direction"], atol=self.direction_tol, rtol=0):
                problems.append(f"orientation of {k!r} differs from {ref!r}")
            if self.origin_tol is not None and not np.allclose(g["origin"], r["origin"], atol=self.origin_tol):
                problems.append(f"origin of {k!r} differs from {ref!r}")
        if problems:
            files = "; ".join(
                f"{k}: {source_name(d[k])} shape={geo[k]['shape']} spacing={np.round(geo[k]['spacing'], 4).tolist()}"
                for k in keys
            )
            raise ValueError(f"modalities are not co-registered: {'; '.join(problems)}. Files: {files}")
        return d

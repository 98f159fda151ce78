"""Foreground masks built from several modalities (e.g. the brain of skull-stripped MRI)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["ForegroundUniond"]


class ForegroundUniond(MapTransform):
    """Add ``mask_key``: voxels where any of ``keys`` exceeds ``threshold`` (float 0/1, one channel).

    For skull-stripped MRI the background is exactly 0, so the union of non-zero voxels over the modalities is
    the brain mask. The mask carries the metadata (affine) of the first key.

    Args:
        keys: images to combine (channel first, same shape).
        mask_key: output key.
        threshold: a voxel is foreground where its value is strictly greater.
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "foreground",
        threshold: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Compute the mask.

        Args:
            data: item dict.

        Returns:
            A new dict with ``mask_key`` added.

        Raises:
            ValueError: the mask is empty (every voxel is background).
        """
        d = dict(data)
        keys = list(self.key_iterator(d))
        mask = None
        for key in keys:
            fg = (torch.as_tensor(d[key]) > self.threshold).any(dim=0, keepdim=True)
            mask = fg if mask is None else mask | fg
        if mask is None:
            return d
        if not bool(mask.any()):
            raise ValueError(f"foreground mask {self.mask_key!r} from {keys} is empty (no value > {self.threshold})")
        out = mask.to(torch.float32)
        first = d[keys[0]]
        if isinstance(first, MetaTensor):
            out = MetaTensor(out.as_tensor() if isinstance(out, MetaTensor) else out, meta=dict(first.meta))
            out.affine = first.affine
        d[self.mask_key] = out
        return d

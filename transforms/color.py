"""Pseudo-coloured RGB fluorescence images to one channel (or to a clean 3-channel RGB)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from transforms.loading import source_name

__all__ = ["RGB_MODES", "PseudoColorToChanneld"]

RGB_MODES = ("max", "sum", "luminance", "red", "green", "blue")
_LUMA = (0.299, 0.587, 0.114)


class PseudoColorToChanneld(MapTransform):
    """Collapse a pseudo-coloured RGB(A) image (channel first) to one intensity channel.

    Fluorescence stains are often saved as one colour of an RGB image (nanoparticles red, vessels green, nuclei
    blue). ``mode="max"`` (default) takes the brightest colour component at each pixel, which recovers the
    stain intensity whatever its colour and is robust to JPEG chroma bleeding; ``"sum"``, ``"luminance"``
    (ITU-R 601 weights) or a single colour (``"red"``, ``"green"``, ``"blue"``) are alternatives. With
    ``keep_rgb=True`` images are instead made 3-channel RGB (alpha dropped, grey repeated).
    Single-channel images pass unchanged (or are repeated to 3 channels with ``keep_rgb``).

    Args:
        keys: keys to convert.
        mode: how to combine colours; one of :data:`RGB_MODES`.
        keep_rgb: keep/make 3 RGB channels instead of collapsing.
        allow_missing_keys: skip keys absent from the item.

    Raises:
        ValueError: unknown mode.
    """

    def __init__(
        self, keys: KeysCollection, mode: str = "max", keep_rgb: bool = False, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in RGB_MODES:
            raise ValueError(f"PseudoColorToChanneld: mode must be one of {RGB_MODES}, got {mode!r}")
        self.mode = mode
        self.keep_rgb = keep_rgb

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert every key.

        Args:
            data: item dict with channel-first images.

        Returns:
            A new dict.

        Raises:
            ValueError: an image has a channel count other than 1, 3 or 4.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            c = x.shape[0]
            if c not in (1, 3, 4):
                raise ValueError(
                    f"modality {key!r} ({source_name(x)}): expected 1 (grey), 3 (RGB) or 4 (RGBA) channels, "
                    f"got {c} (shape {tuple(x.shape)})"
                )
            if self.keep_rgb:
                d[key] = x.repeat(3, *([1] * (x.ndim - 1))) if c == 1 else x[:3]
                continue
            if c == 1:
                continue
            rgb = x[:3]
            if self.mode == "max":
                out = rgb.max(dim=0, keepdim=True).values if torch.is_tensor(rgb) else rgb.max(0, keepdims=True)
            elif self.mode == "sum":
                out = rgb.sum(0, keepdim=True) if torch.is_tensor(rgb) else rgb.sum(0, keepdims=True)
            elif self.mode == "luminance":
                out = _LUMA[0] * rgb[0:1] + _LUMA[1] * rgb[1:2] + _LUMA[2] * rgb[2:3]
            else:
                i = ("red", "green", "blue").index(self.mode)
                out = rgb[i : i + 1]
            d[key] = out
        return d

"""2D slices of 3D volumes: random slices with enough foreground (training) and whole-volume iteration (inference).

Images are channel first, ``[C, X, Y, Z]``; ``axis`` counts spatial axes, so ``axis=2`` (the default) is the
last one, the axial (superior-inferior) axis after ``Orientationd(axcodes="RAS")`` or ``"LPS"``. A slice is a
MetaTensor ``[C, X, Y]`` with a 3x3 in-plane affine and ``meta['slice_index']`` / ``meta['slice_axis']``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from transforms.checks import affine_of
from transforms.loading import source_name

__all__ = ["RandAxialSliced", "foreground_fractions", "iter_slices", "stack_slices", "take_slice"]


def take_slice(x: Any, index: int, axis: int = 2) -> Any:
    """Take one 2D slice of a channel-first 3D image.

    Args:
        x: ``[C, X, Y, Z]`` tensor / MetaTensor.
        index: slice index along ``axis``.
        axis: spatial axis (0, 1, 2).

    Returns:
        ``[C, ., .]``; a MetaTensor gets the in-plane 3x3 affine and ``slice_index``/``slice_axis`` metadata.
    """
    t = torch.as_tensor(x)
    out = t.select(axis + 1, index)
    if isinstance(x, MetaTensor):
        aff = affine_of(x)
        keep = [i for i in range(3) if i != axis]
        aff2 = np.eye(3)
        aff2[:2, :2] = aff[np.ix_(keep, keep)]
        aff2[:2, 2] = aff[keep, 3] + aff[keep, axis] * index
        meta = {k: v for k, v in x.meta.items() if k not in ("affine", "original_affine", "spatial_shape")}
        meta.update({"slice_index": int(index), "slice_axis": int(axis), "spatial_shape": np.asarray(out.shape[1:])})
        out = MetaTensor(
            out.as_tensor() if isinstance(out, MetaTensor) else out, affine=torch.as_tensor(aff2), meta=meta
        )
    return out


def foreground_fractions(mask: Any, axis: int = 2) -> np.ndarray:
    """Fraction of foreground pixels (``mask > 0`` in any channel) in every slice along ``axis``.

    Args:
        mask: channel-first 3D mask or image.
        axis: spatial axis.

    Returns:
        1D array, one fraction per slice.
    """
    m = (torch.as_tensor(mask) > 0).any(dim=0)
    dims = [i for i in range(3) if i != axis]
    return m.float().mean(dim=dims).cpu().numpy()


class RandAxialSliced(Randomizable, MapTransform):
    """Sample ``num_samples`` random 2D slices (same index for all keys) with enough foreground.

    Returns a list of items (MONAI's collate flattens it), like ``RandCropByPosNegLabeld``. Candidate slices
    are those whose foreground fraction (of ``foreground_key``, default the first key ``> 0``) is at least
    ``min_foreground``.

    Args:
        keys: keys to slice (3D channel-first).
        foreground_key: key of the mask that decides which slices qualify (e.g. ``"brain_mask"``).
        min_foreground: minimum foreground fraction of a slice, in [0, 1].
        num_samples: slices per volume.
        axis: spatial axis to slice (2 = last, axial in RAS/LPS).
        allow_missing_keys: skip keys absent from the item.

    Raises:
        ValueError: invalid settings.
    """

    def __init__(
        self,
        keys: KeysCollection,
        foreground_key: str | None = None,
        min_foreground: float = 0.1,
        num_samples: int = 1,
        axis: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 <= min_foreground <= 1.0:
            raise ValueError(f"RandAxialSliced: min_foreground must be in [0, 1], got {min_foreground}")
        if num_samples < 1:
            raise ValueError(f"RandAxialSliced: num_samples must be >= 1, got {num_samples}")
        if axis not in (0, 1, 2):
            raise ValueError(f"RandAxialSliced: axis must be 0, 1 or 2, got {axis}")
        self.foreground_key = foreground_key
        self.min_foreground = min_foreground
        self.num_samples = num_samples
        self.axis = axis
        self._indices: list[int] = []

    def randomize(self, fractions: np.ndarray) -> None:
        """Draw the slice indices among the qualifying slices.

        Args:
            fractions: foreground fraction of every slice.

        Raises:
            ValueError: no slice qualifies.
        """
        candidates = np.flatnonzero(fractions >= self.min_foreground)
        if candidates.size == 0:
            raise ValueError(
                f"no slice along axis {self.axis} has a foreground fraction >= {self.min_foreground} "
                f"(best {float(fractions.max()) if fractions.size else 0:.3f})"
            )
        self._indices = self.R.choice(
            candidates, size=self.num_samples, replace=candidates.size < self.num_samples
        ).tolist()

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        """Slice the item.

        Args:
            data: item dict with channel-first 3D images.

        Returns:
            ``num_samples`` item dicts with 2D images (other fields copied).

        Raises:
            ValueError: data is not 3D or no slice qualifies.
        """
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            if torch.as_tensor(d[key]).ndim != 4:
                raise ValueError(
                    f"modality {key!r} ({source_name(d[key])}): expected a channel-first 3D volume [C, X, Y, Z], "
                    f"got shape {tuple(d[key].shape)}"
                )
        ref_key = self.foreground_key if self.foreground_key is not None else keys[0]
        if ref_key not in d:
            raise ValueError(f"RandAxialSliced: foreground key {ref_key!r} not in the item")
        try:
            self.randomize(foreground_fractions(d[ref_key], self.axis))
        except ValueError as err:
            raise ValueError(f"{source_name(d[ref_key])}: {err}") from err
        out = []
        for index in self._indices:
            item = dict(d)
            for key in {*keys, *([self.foreground_key] if self.foreground_key in d else [])}:
                item[key] = take_slice(d[key], index, self.axis)
            out.append(item)
        return out


def iter_slices(
    data: Mapping[Hashable, Any],
    keys: Sequence[str],
    axis: int = 2,
    min_foreground: float = 0.0,
    foreground_key: str | None = None,
) -> Iterator[dict[Hashable, Any]]:
    """Iterate over every slice of a volume item, in order (inference).

    Slices whose foreground fraction is below ``min_foreground`` are skipped (with the default 0 none are), so
    a prediction can be reassembled with :func:`stack_slices` using each item's ``slice_index``.

    Args:
        data: item dict with channel-first 3D images.
        keys: keys to slice.
        axis: spatial axis.
        min_foreground: minimum foreground fraction (of ``foreground_key`` or the first key).
        foreground_key: mask key deciding the fraction.

    Yields:
        Item dicts with 2D images and ``slice_index``.
    """
    keys = list(keys)
    ref = d_ref = data[foreground_key if foreground_key is not None else keys[0]]
    fractions = foreground_fractions(ref, axis) if min_foreground > 0 else None
    n = torch.as_tensor(d_ref).shape[axis + 1]
    for index in range(n):
        if fractions is not None and fractions[index] < min_foreground:
            continue
        item = dict(data)
        for key in keys:
            item[key] = take_slice(data[key], index, axis)
        item["slice_index"] = index
        yield item


def stack_slices(
    slices: Sequence[torch.Tensor],
    indices: Sequence[int] | None = None,
    depth: int | None = None,
    axis: int = 2,
    fill: float = -1.0,
) -> torch.Tensor:
    """Reassemble 2D slices ``[C, ., .]`` into a 3D volume ``[C, X, Y, Z]``.

    Args:
        slices: the slices.
        indices: their positions along ``axis`` (default ``0..len-1``).
        depth: number of slices of the volume (default ``max(indices) + 1``).
        axis: spatial axis.
        fill: value of missing slices.

    Returns:
        The volume (plain tensor).
    """
    indices = list(range(len(slices))) if indices is None else [int(i) for i in indices]
    depth = max(indices) + 1 if depth is None else depth
    first = torch.as_tensor(slices[0])
    shape = list(first.shape)
    shape.insert(axis + 1, depth)
    vol = torch.full(shape, fill, dtype=first.dtype)
    for s, i in zip(slices, indices):
        vol.select(axis + 1, i).copy_(torch.as_tensor(s))
    return vol

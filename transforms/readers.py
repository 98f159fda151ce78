"""Image readers MONAI lacks: a plain TIFF reader (``tifffile``) that keeps every page.

MONAI's ``PILReader`` reads only the first page of a multi-page TIFF, which would hide a 3D stack where a 2D
image is expected; :class:`TiffReader` returns the full array so the dimension check can see it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tifffile
from monai.data import ImageReader, NibabelReader, PILReader
from monai.utils import MetaKeys, ensure_tuple

__all__ = ["TiffReader", "default_readers"]

_TIFF_SUFFIXES = (".tif", ".tiff")


class TiffReader(ImageReader):
    """Read ``.tif``/``.tiff`` files with ``tifffile`` (all pages; RGB(A) as channel-last).

    Arrays keep numpy (row, column) order, like ``PILReader(reverse_indexing=False)``, so PNG, JPEG and TIFF
    images of the same scene load with the same orientation. A trailing axis of length 3 or 4 on a 3D array is
    taken as colour channels; any other 3D array is a stack (3 spatial dimensions).
    """

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """Whether every file name ends in ``.tif`` or ``.tiff``.

        Args:
            filename: a file name or a sequence of them.

        Returns:
            True when all are TIFF files.
        """
        return all(str(f).lower().endswith(_TIFF_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any) -> Any:
        """Read one or several TIFF files.

        Args:
            data: file name(s).
            kwargs: passed to ``tifffile.imread``.

        Returns:
            An array, or a list of arrays for several files.

        Raises:
            ValueError: a file holds no pixel data (truncated).
        """
        arrays = [np.asarray(tifffile.imread(os.fspath(f), **kwargs)) for f in ensure_tuple(data)]
        for f, a in zip(ensure_tuple(data), arrays):
            if a.size == 0:
                raise ValueError(f"{f}: no pixel data (truncated or corrupt TIFF)")
        return arrays if len(arrays) > 1 else arrays[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """Return the array (several files stacked as the first axis) and its metadata.

        Args:
            img: what :meth:`read` returned.

        Returns:
            ``(array, meta)`` with ``spatial_shape`` and ``original_channel_dim`` set.
        """
        arrays = img if isinstance(img, list) else [img]
        meta: dict[str, Any] = {}
        rgb = arrays[0].ndim == 3 and arrays[0].shape[-1] in (3, 4)
        spatial = arrays[0].shape[:-1] if rgb else arrays[0].shape
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(spatial)
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1 if rgb else float("nan")
        if len(arrays) > 1:
            if rgb:
                raise ValueError("TiffReader: stacking several RGB TIFF files is not supported")
            data = np.stack(arrays, axis=0)
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        else:
            data = arrays[0]
        return data, meta


def default_readers() -> list[ImageReader]:
    """Readers used by the project's pipelines, tried by file suffix.

    Returns:
        ``[NibabelReader(), PILReader(reverse_indexing=False), TiffReader()]`` (MONAI tries the last matching
        one first).
    """
    return [NibabelReader(), PILReader(reverse_indexing=False), TiffReader()]

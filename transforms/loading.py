"""Loading with errors that name the key and the file (wraps MONAI ``LoadImage``)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import LoadImage, MapTransform

from ddcore.content import check_real_file
from transforms.readers import default_readers

__all__ = ["LoadImageCheckedd", "source_name"]


def source_name(value: Any) -> str:
    """Best description of where an image came from (its file name if known).

    Args:
        value: a path, a MetaTensor (uses ``meta['filename_or_obj']``) or anything else.

    Returns:
        A string for error messages.
    """
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return "<in-memory data>"


class LoadImageCheckedd(MapTransform):
    """``LoadImaged`` (image_only, channel first) that fails early and clearly.

    A missing file raises ``FileNotFoundError`` and an unreadable or truncated file raises ``ValueError``; both
    name the key and the file. Readers are chosen by suffix from :func:`transforms.readers.default_readers`
    (NIfTI via nibabel, PNG/JPEG via PIL in numpy row/column order, TIFF via tifffile) unless given.

    Args:
        keys: keys holding file paths.
        reader: MONAI reader instance(s) or names; defaults to the project's readers.
        ensure_channel_first: add/move the channel dimension first.
        dtype: output dtype.
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: ImageReader | str | Sequence[ImageReader | str] | None = None,
        ensure_channel_first: bool = True,
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(reader=reader, image_only=True, ensure_channel_first=ensure_channel_first, dtype=dtype)
        if reader is None:
            self.loader.readers = default_readers()  # chosen by suffix, last matching first

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Load every key (all files are checked for existence before any is read).

        Args:
            data: item dict with file paths.

        Returns:
            A new dict with MetaTensors in place of the paths.

        Raises:
            FileNotFoundError: a file does not exist.
            ValueError: a file cannot be read (unknown format, truncated, corrupt) or stores complex values.
        """
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            value = d[key]
            if isinstance(value, (str, os.PathLike)) and not Path(value).expanduser().exists():
                raise FileNotFoundError(f"modality {key!r}: file not found: {value}")
        for key in keys:
            value = d[key]
            if not isinstance(value, (str, os.PathLike)):
                continue  # already loaded
            check_real_file(value, f"modality {key!r}")  # the float cast below would drop an imaginary part
            try:
                d[key] = self.loader(value)
            except Exception as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise ValueError(
                    f"modality {key!r}: cannot read {value} (expected a readable, complete image file): "
                    f"{type(err).__name__}: {first}"
                ) from err
        return d

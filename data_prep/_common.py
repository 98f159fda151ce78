"""Helpers shared by the converters (file discovery, image checks, split arguments)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from PIL import Image

from ddcore.content import ContentError, check_finite, check_real_file

__all__ = [
    "IMAGE_SUFFIXES",
    "add_split_args",
    "check_image_files",
    "check_same_shapes",
    "default_datalist_path",
    "image_files",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def image_files(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Map file name -> path for the (non-hidden) image files directly inside ``folder``.

    Args:
        folder: folder to list.
        suffixes: accepted lower-case suffixes.

    Returns:
        Dict sorted by name.
    """
    sfx = tuple(suffixes)
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(sfx)
    }


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Height and width of a 2D image array (an RGB(A) trailing axis dropped)."""
    return tuple(shape[:-1]) if len(shape) == 3 and shape[-1] in (3, 4) else tuple(shape)


def check_image_files(paths: Iterable[Path], level: str = "header") -> dict[Path, tuple[int, ...]]:
    """Open every 2D image file to catch unreadable, truncated or wrong-valued ones before anything is written.

    Args:
        paths: files to check.
        level: ``"none"``, ``"header"`` (open + format verification, real dtype) or ``"full"`` (decode every
            pixel and check the content: finite, real values; see :mod:`ddcore.content`).

    Returns:
        ``{path: spatial shape}`` (height, width; empty for ``"none"``), for :func:`check_same_shapes`.

    Raises:
        ValueError: the first unreadable file or bad content (named), or an unknown level.
    """
    if level not in ("none", "header", "full"):
        raise ValueError(f"check level must be 'none', 'header' or 'full', got {level!r}")
    shapes: dict[Path, tuple[int, ...]] = {}
    if level == "none":
        return shapes
    for p in paths:
        try:
            if str(p).lower().endswith((".tif", ".tiff")):
                import tifffile

                with tifffile.TiffFile(p) as tif:
                    if not tif.pages or not tif.series:
                        raise ValueError("no image page")
                    if level == "full":
                        array = tif.asarray()
                        check_finite(array, "image", str(p))
                        shape = array.shape
                    else:
                        check_real_file(p, "image")
                        shape = tuple(tif.series[0].shape)
            else:
                with Image.open(p) as im:
                    if level == "full":
                        im.load()
                    else:
                        im.verify()
                    shape = (im.size[1], im.size[0])
        except ContentError:
            raise
        except Exception as err:
            raise ValueError(f"unreadable or truncated image file {p}: {type(err).__name__}: {err}") from err
        shapes[Path(p)] = _spatial_shape(tuple(int(v) for v in shape))
    return shapes


def check_same_shapes(groups: Mapping[str, Mapping[str, Path]], shapes: Mapping[Path, tuple[int, ...]]) -> None:
    """Raise unless the channels of every item have the same spatial size.

    Args:
        groups: ``{item id: {channel: path}}``.
        shapes: what :func:`check_image_files` returned (items without shapes are skipped).

    Raises:
        ValueError: listing up to five items whose channels differ in size, with each channel's size.
    """
    bad = []
    for item, channels in groups.items():
        sizes = {k: shapes[Path(p)] for k, p in channels.items() if Path(p) in shapes}
        if len(set(sizes.values())) > 1:
            sizes_text = (f"{k} {'x'.join(map(str, v))} ({Path(channels[k]).name})" for k, v in sizes.items())
            bad.append(f"{item}: " + ", ".join(sizes_text))
    if bad:
        raise ValueError(
            f"{len(bad)} item(s) whose channels differ in size (expected one size per item): " + "; ".join(bad[:5])
        )


def add_split_args(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--val-fraction``, ``--test-fraction`` and ``--seed`` to a converter's parser.

    Args:
        parser: the parser.
        what: the unit that is split (e.g. ``"subjects"``), for the help text.
    """
    parser.add_argument("--val-fraction", type=float, default=0.1, help=f"fraction of {what} for validation")
    parser.add_argument("--test-fraction", type=float, default=0.1, help=f"fraction of {what} for test")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the split")


def default_datalist_path(root: Path, given: str | os.PathLike | None) -> Path:
    """``given`` or ``<root>/datalist.json``."""
    return Path(given) if given else root / "datalist.json"

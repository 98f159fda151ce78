"""Helpers shared by the converters (file discovery, image checks, split arguments)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "add_split_args",
    "check_image_files",
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


def check_image_files(paths: Iterable[Path], level: str = "header") -> None:
    """Open every 2D image file to catch unreadable or truncated ones before anything is written.

    Args:
        paths: files to check.
        level: ``"none"``, ``"header"`` (open + format verification) or ``"full"`` (decode every pixel).

    Raises:
        ValueError: the first unreadable file (named), or an unknown level.
    """
    if level not in ("none", "header", "full"):
        raise ValueError(f"check level must be 'none', 'header' or 'full', got {level!r}")
    if level == "none":
        return
    for p in paths:
        try:
            if str(p).lower().endswith((".tif", ".tiff")):
                import tifffile

                with tifffile.TiffFile(p) as tif:
                    if level == "full":
                        tif.asarray()
                    elif not tif.pages:
                        raise ValueError("no image page")
            else:
                with Image.open(p) as im:
                    if level == "full":
                        im.load()
                    else:
                        im.verify()
        except Exception as err:
            raise ValueError(f"unreadable or truncated image file {p}: {type(err).__name__}: {err}") from err


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

"""Where the optional shared example data lives (``../shared/data`` or ``$SHARED_DATA``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "shared_data_dir"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """Return the shared example-data folder, or ``None`` when it is absent.

    The environment variable ``SHARED_DATA`` wins; otherwise ``<repo>/../shared/data`` is used.

    Returns:
        The folder if it exists, else ``None``.
    """
    env = os.environ.get("SHARED_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None

"""The app's one way into the project: read a bundle's config files with ``monai.bundle.ConfigParser`` and run the
parsed objects (the same objects ``python -m monai.bundle run ...`` runs), never the project's module paths.

A :class:`BundleConfig` merges the config files once (``common.json`` + ``inference.json`` + overlays, in order),
applies fixed overrides (``bundle_root``, ``device``, user overrides) and hands out a fresh parser per request,
into which the request's settings go as ordinary config overrides. Objects that are costly to build and do not
change between requests (the loaded network) are built once and handed to the next parsers as parser globals
(``"network": "$label_cached_network"``), so a request only re-instantiates the light objects (data, sampler,
writer, evaluator).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["BundleConfig", "config_paths"]

logger = logging.getLogger(__name__)

#: the repository's bundle folder (``label/`` sits beside ``bundle/`` in a checkout)
REPO_BUNDLE = Path(__file__).resolve().parents[2] / "bundle"


def config_paths(bundle_root: str | Path, names: str | Sequence[str]) -> list[Path]:
    """Absolute config file paths.

    A name may be absolute; otherwise it is looked up in ``<bundle_root>/configs`` and then in the repository's
    ``bundle/configs`` (a bundle trained into another folder keeps using the checkout's configs).

    Args:
        bundle_root: the bundle folder (``models/`` inside).
        names: comma-separated string or list of config file names.

    Returns:
        The paths, in merge order.

    Raises:
        FileNotFoundError: a config file exists in neither place (names both).
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    paths = []
    for name in names:
        candidates = [Path(name)] if Path(name).is_absolute() else []
        candidates += [Path(bundle_root) / "configs" / name, REPO_BUNDLE / "configs" / name]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"bundle config {name!r} not found (looked in {[str(c) for c in candidates]})")
        paths.append(hit)
    return paths


class BundleConfig:
    """Merged bundle configs with per-request parsers.

    Args:
        bundle_root: the bundle folder (``models/model.pt`` etc. inside); set as ``bundle_root``.
        configs: config files in merge order (see :func:`config_paths`).
        meta_file: ``metadata.json`` (for ``@_meta_#version``); default ``configs/metadata.json`` next to the first
            config.
        overrides: extra fixed overrides (a dict, or a JSON string), applied after ``bundle_root``.
        device: torch device name for ``device``.
    """

    def __init__(
        self,
        bundle_root: str | Path,
        configs: Sequence[str | Path],
        meta_file: str | Path | None = None,
        overrides: Mapping[str, Any] | str | None = None,
        device: str = "cpu",
    ) -> None:
        self.bundle_root = Path(bundle_root).resolve()
        self.configs = [str(Path(c)) for c in configs]
        self.meta_file = str(meta_file or Path(self.configs[0]).parent / "metadata.json")
        if isinstance(overrides, str):
            overrides = json.loads(overrides) if overrides.strip() else {}
        self.overrides = dict(overrides or {})
        self.device = device
        parser = ConfigParser()
        parser.read_config(self.configs)
        if os.path.isfile(self.meta_file):
            parser.read_meta(self.meta_file)
        parser["bundle_root"] = str(self.bundle_root)
        parser["device"] = f"$torch.device({device!r})"
        for key, value in self.overrides.items():
            parser[key] = value
        self._raw = copy.deepcopy(parser.get())
        self.globals: dict[str, Any] = {}

    def has(self, key: str) -> bool:
        """Whether the merged config defines ``key`` (``a#b`` paths allowed)."""
        parser = ConfigParser(copy.deepcopy(self._raw))
        try:
            parser[key]
        except (KeyError, IndexError, TypeError, ValueError):
            return False
        return True

    def parser(self, overrides: Mapping[str, Any] | None = None) -> ConfigParser:
        """A fresh parser of the merged config with ``overrides`` applied and the cached objects as globals.

        Args:
            overrides: per-request config overrides (``a#b`` keys allowed).

        Returns:
            The parser (nothing instantiated yet).
        """
        parser = ConfigParser(copy.deepcopy(self._raw), globals=dict(self.globals))
        for key, value in (overrides or {}).items():
            parser[key] = value
        return parser

    def cache(self, key: str, parser: ConfigParser | None = None) -> Any:
        """Build ``key`` once and make later parsers use that object (``"<key>": "$label_cached_<key>"``).

        Args:
            key: config id of the object (e.g. ``network``).
            parser: parser to build it with (default: a fresh one).

        Returns:
            The object.
        """
        name = f"label_cached_{key.replace('#', '_')}"
        if name not in self.globals:
            parser = parser or self.parser()
            self.globals[name] = parser.get_parsed_content(key)
            logger.info("built %s once from %s", key, ", ".join(Path(c).name for c in self.configs))
        self._raw_set(key, f"${name}")
        return self.globals[name]

    def _raw_set(self, key: str, value: Any) -> None:
        parser = ConfigParser(self._raw)
        parser[key] = value
        self._raw = parser.get()

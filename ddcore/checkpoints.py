"""Checkpoints of every trainer of the project (DAMM and DRDM): one name pattern, discovery, atomic saving, checked
loading and resuming.

Names: ``checkpoint_epoch=N.pt`` / ``checkpoint_iteration=N.pt``, or ``<prefix>_checkpoint_epoch=N.pt`` with a
``file_prefix``, which are the names ignite's ``Checkpoint`` gives inside MONAI's
:class:`~monai.handlers.CheckpointSaver` (:func:`checkpoint_filename` builds one). A checkpoint is
``{name: obj.state_dict()}`` for the saver's ``save_dict`` (the engine included, for its epoch/iteration counters),
readable with ``torch.load(..., weights_only=True)``.

- :class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` writing through :func:`ddcore.atomic.atomic_torch_save`
  (MONAI builds ignite's ``DiskSaver`` with ``atomic=False``, so a kill mid-write would leave a truncated file
  under the final name), keeping the newest ``n_saved`` checkpoints of the folder (older runs' files included, see
  :func:`prune_checkpoints`) and optionally exporting the network's plain state dict when training completes.
- :func:`latest_checkpoint` finds the newest one, ignoring temporary files of interrupted writes and other names;
  :func:`load_latest_checkpoint` falls back to the previous one (with a warning) when the newest cannot be read.
- :func:`check_state_dict` / :func:`load_checked_state_dict` load weights only after checking every key and shape,
  so a checkpoint from another configuration fails with a message naming the file and the tensors.
- :class:`ResumeFromCheckpoint` restores a trainer from the newest readable checkpoint with MONAI's
  :class:`~monai.handlers.CheckpointLoader`; with a ``seed`` it also attaches
  :class:`~ddcore.seeding.EpochSeeding`, which makes every epoch's randomness (data order, noise, timesteps,
  random transforms) a function of ``(seed, stream, epoch)`` only, so a run killed at any moment and resumed
  from its last epoch checkpoint repeats exactly what the uninterrupted run did.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from ddcore.atomic import atomic_torch_save, is_temporary, remove_stale_temporaries
from ddcore.device import is_rank_zero
from ddcore.seeding import EpochSeeding

__all__ = [
    "AtomicCheckpointSaver",
    "ResumeFromCheckpoint",
    "check_state_dict",
    "checkpoint_filename",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checked_state_dict",
    "load_checkpoint",
    "load_latest_checkpoint",
    "prune_checkpoints",
]

logger = logging.getLogger(__name__)

UNITS = ("epoch", "iteration")


def checkpoint_filename(number: int, prefix: str = "", unit: str = "epoch") -> str:
    """The file name of checkpoint ``number`` (the name :class:`AtomicCheckpointSaver` writes).

    Args:
        number: the epoch or iteration.
        prefix: the saver's ``file_prefix`` (joined with ``_``, as ignite does).
        unit: ``"epoch"`` or ``"iteration"`` (the saver's ``epoch_level``).

    Returns:
        ``[<prefix>_]checkpoint_<unit>=<number>.pt``.

    Raises:
        ValueError: an unknown ``unit``.
    """
    if unit not in UNITS:
        raise ValueError(f"checkpoint unit must be one of {UNITS}, got {unit!r}.")
    return f"{prefix + '_' if prefix else ''}checkpoint_{unit}={int(number)}.pt"


def _name_pattern(prefix: str) -> re.Pattern:
    head = re.escape(prefix + "_") if prefix else ""
    return re.compile(rf"^{head}checkpoint_(epoch|iteration)=(\d+)\.pt$")


def list_checkpoints(folder: str | os.PathLike, prefix: str = "", unit: str | None = None) -> list[Path]:
    """The checkpoints of a folder, newest (highest number) first.

    Only files named exactly as :func:`checkpoint_filename` would name them count: temporary files of an
    interrupted atomic write (``.checkpoint_epoch=3.<hex>.tmp.pt``, see :func:`ddcore.atomic.is_temporary`), other
    prefixes, final exports (``model.pt``) and anything else are ignored.

    Args:
        folder: a saver's folder (may not exist).
        prefix: the saver's ``file_prefix``.
        unit: only ``"epoch"`` or only ``"iteration"`` checkpoints (``None``: both).

    Returns:
        The paths, numerically sorted (``epoch=10`` after ``epoch=9``), newest first.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = _name_pattern(prefix)
    found = []
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match is None or is_temporary(path) or not path.is_file():
            continue
        if unit is not None and match.group(1) != unit:
            continue
        found.append((int(match.group(2)), path.stat().st_mtime, path))
    return [path for *_, path in sorted(found, key=lambda item: item[:2], reverse=True)]


def latest_checkpoint(folder: str | os.PathLike, prefix: str = "") -> Path | None:
    """The newest checkpoint of a folder (see :func:`list_checkpoints`), without reading it.

    Args:
        folder: a saver's folder (may not exist).
        prefix: the saver's ``file_prefix``.

    Returns:
        The path, or ``None`` when the folder holds none.
    """
    found = list_checkpoints(folder, prefix)
    return found[0] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(..., map_location="cpu", weights_only=True)``.

    Args:
        path: the file.

    Returns:
        The checkpoint (a dict of state dicts, or one plain state dict).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read (truncated, corrupt, not a tensor dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated / foreign files
        raise ValueError(f"checkpoint {path} cannot be read: {type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of tensors.")
    return dict(checkpoint)


def load_latest_checkpoint(folder: str | os.PathLike, prefix: str = "") -> tuple[Path, dict[str, Any]] | None:
    """Read the newest checkpoint of a folder that can be read, newest first.

    A checkpoint that cannot be read (e.g. truncated by a full disk or a copy) is skipped with a warning naming
    it, and the previous one is tried.

    Args:
        folder: a saver's folder (may not exist).
        prefix: the saver's ``file_prefix``.

    Returns:
        ``(path, checkpoint)``, or ``None`` when the folder holds no checkpoint.

    Raises:
        ValueError: the folder holds checkpoints but none can be read.
    """
    candidates = list_checkpoints(folder, prefix)
    errors = []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except ValueError as err:
            message = f"skipping an unreadable checkpoint ({err}); trying the previous one"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logger.warning(message)
            errors.append(path.name)
    if errors:
        raise ValueError(
            f"no checkpoint of {folder} can be read ({', '.join(errors)}): delete them to start afresh, or restore "
            "a readable copy."
        )
    return None


def prune_checkpoints(
    folder: str | os.PathLike, n_saved: int, prefix: str = "", keep: str | os.PathLike | None = None
) -> list[Path]:
    """Keep only the newest ``n_saved`` checkpoints of a folder (of ``keep``'s unit) and delete the others.

    ``keep`` (the checkpoint just written) always stays and counts as the newest: files with a higher number were
    left by an earlier run that went further and was not resumed, and would otherwise be picked when resuming.

    Args:
        folder: the saver's folder.
        n_saved: checkpoints to keep (>= 1).
        prefix: the saver's ``file_prefix``.
        keep: the file just written (name or path in ``folder``).

    Returns:
        The deleted paths.

    Raises:
        ValueError: ``n_saved < 1``.
    """
    if int(n_saved) < 1:
        raise ValueError(f"n_saved must be >= 1, got {n_saved}.")
    folder = Path(folder)
    unit, number = None, None
    if keep is not None:
        keep = folder / Path(keep).name
        match = _name_pattern(prefix).match(keep.name)
        if match is not None:
            unit, number = match.group(1), int(match.group(2))
    kept = [] if keep is None else [keep]
    removed = []
    for path in list_checkpoints(folder, prefix, unit):
        if path in kept:
            continue
        other = int(_name_pattern(prefix).match(path.name).group(2))
        if len(kept) < int(n_saved) and (number is None or other < number):
            kept.append(path)
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else module


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str = "model") -> None:
    """Check that ``state`` has exactly the keys and tensor shapes of ``module``.

    Args:
        module: the module the state will be loaded into (a ``DataParallel``/DDP wrapper is unwrapped).
        state: a state dict.
        source: where the state comes from (a file path), for the message.
        what: what the module is ("autoencoder 'vessel'", "denoiser"), for the message.

    Raises:
        ValueError: naming the file, up to five offending keys with both shapes, and what to do.
    """
    expected = _unwrap(module).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs configured {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        lines = []
        if wrong:
            lines.append(f"{len(wrong)} tensor(s) with another shape, e.g. " + "; ".join(wrong[:5]))
        if missing:
            lines.append(f"{len(missing)} key(s) missing, e.g. " + ", ".join(missing[:5]))
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected key(s), e.g. " + ", ".join(unexpected[:5]))
        raise ValueError(
            f"Checkpoint '{source}' does not match the configured {what}: it was written by a different "
            f"configuration (channels, latent size, modalities...). " + " | ".join(lines) + ". Use the "
            "configuration that wrote it, or delete it / point the run at another output folder to start afresh."
        )


def load_checked_state_dict(
    module: nn.Module, path: str | os.PathLike, what: str = "model", key: str | None = None
) -> dict[str, Any]:
    """Load weights into ``module`` strictly, after :func:`check_state_dict` (``weights_only=True``).

    Args:
        module: destination module (a ``DataParallel``/DDP wrapper is unwrapped).
        path: a plain state dict file (a final export such as ``model.pt``) or a multi-object checkpoint.
        what: what the module is, for the messages.
        key: the entry holding the module's state in a multi-object checkpoint (``{key: state_dict, ...}``); a
            file without such an entry is read as the module's plain state dict.

    Returns:
        The whole loaded file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read, or does not match the configured module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint for the {what} not found: '{path}' (train first, or set its path).")
    checkpoint = load_checkpoint(path)
    state = checkpoint[key] if key is not None and isinstance(checkpoint.get(key), Mapping) else checkpoint
    check_state_dict(module, state, str(path), what)
    _unwrap(module).load_state_dict(state, strict=True)
    return checkpoint


class _AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` writing through :func:`ddcore.atomic.atomic_torch_save`, with a fixed file name
    (``filename``, as MONAI's own saver allows) or, for periodic checkpoints, pruning to ``n_saved`` files."""

    def __init__(
        self, dirname: str | os.PathLike, filename: str | None = None, n_saved: int | None = None, prefix: str = ""
    ) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename
        self.n_saved = n_saved
        self.prefix = prefix

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        if self.n_saved is not None and is_rank_zero():
            prune_checkpoints(self.dirname, self.n_saved, self.prefix, keep=filename)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        atomic_torch_save(checkpoint, path)

    def remove(self, filename: str) -> None:
        path = self.dirname / (self.filename or filename)
        if is_rank_zero():
            path.unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI :class:`~monai.handlers.CheckpointSaver` whose files are written atomically (temp file, then rename).

    Same arguments as ``CheckpointSaver`` (``save_interval``, ``n_saved``, ``epoch_level``, ``file_prefix``, the
    key-metric options), with four differences:

    - every file goes through :func:`ddcore.atomic.atomic_torch_save`, so an interrupted run never leaves a
      truncated checkpoint under a final name; temporary files a killed run left in ``save_dir`` are removed
      when the saver is attached;
    - ``n_saved`` counts the checkpoints of the folder, not only those of this run: after each save the folder is
      pruned with :func:`prune_checkpoints` (ignite only forgets the files it wrote itself);
    - with ``engine_key`` set, the engine the handler is attached to is added to ``save_dict`` under that key (its
      epoch/iteration counters are saved, and a bundle config needs no reference from the trainer's handlers
      back to the trainer);
    - ``final_filename`` is a weights export: the plain state dict of ``save_dict[final_key]``, written when the
      run completes, and only then (MONAI's ``save_final`` also writes on an exception, which would make a
      crashed run look finished; it is not supported here).

    Args:
        save_dir: checkpoint folder.
        save_dict: objects to save (``{name: object with state_dict()}``).
        engine_key: key under which the attached engine is saved (``None``: not added).
        final_filename: file written in ``save_dir`` when training completes (``None``: none).
        final_key: the ``save_dict`` entry exported to ``final_filename``.
        **kwargs: other :class:`~monai.handlers.CheckpointSaver` arguments.

    Raises:
        ValueError: ``save_final=True`` (use ``final_filename``).
        KeyError: at attach, ``final_filename`` is set but ``save_dict`` has no ``final_key``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: dict,
        engine_key: str | None = "trainer",
        final_filename: str | None = None,
        final_key: str = "model",
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("save_final", False):
            raise ValueError("AtomicCheckpointSaver: save_final is not supported; set final_filename instead.")
        super().__init__(save_dir=str(save_dir), save_dict=save_dict, **kwargs)
        self.engine_key = engine_key
        self.final_filename = final_filename
        self.final_key = final_key
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.save_handler = _AtomicDiskSaver(save_dir, kwargs.get("key_metric_filename"))
        if self._interval_checkpoint is not None:
            self._interval_checkpoint.save_handler = _AtomicDiskSaver(
                save_dir, n_saved=kwargs.get("n_saved"), prefix=kwargs.get("file_prefix", "")
            )

    def attach(self, engine: Engine) -> None:
        """Add ``engine`` to ``save_dict`` (under ``engine_key``), clear stale temporaries, register the events.

        Args:
            engine: the trainer.

        Raises:
            KeyError: ``final_filename`` is set and ``save_dict`` has no ``final_key`` entry.
        """
        if self.final_filename and self.final_key not in self.save_dict:
            raise KeyError(
                f"AtomicCheckpointSaver: final_filename={self.final_filename!r} exports save_dict[{self.final_key!r}]"
                f", but save_dict has only {sorted(self.save_dict)}."
            )
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine
        if is_rank_zero():
            remove_stale_temporaries(self.save_dir)
        super().attach(engine)
        if self.final_filename:
            engine.add_event_handler(Events.COMPLETED, self._export_final)

    def _export_final(self, engine: Engine) -> None:
        if not is_rank_zero():
            return
        path = Path(self.save_dir) / str(self.final_filename)
        atomic_torch_save(_unwrap(self.save_dict[self.final_key]).state_dict(), path)
        logger.info(f"training completed, weights of {self.final_key!r} written to {path}")


class ResumeFromCheckpoint:
    """Resume an engine from the newest readable checkpoint of a folder (no-op when the folder holds none).

    Attach it to a trainer before running: at ``STARTED`` it reads the newest checkpoint written by
    :class:`AtomicCheckpointSaver` (falling back to the previous one, with a warning, when the newest cannot be
    read), checks every module's tensor shapes against the current configuration (clear ``ValueError``
    otherwise) and restores all objects of ``load_dict`` (networks, optimisers, the engine's epoch/iteration
    counters) with MONAI's ``CheckpointLoader``.

    Exact resume: checkpoints are written at epoch ends (the position in the epoch is then always its end; a kill
    mid-epoch repeats that epoch). With ``seed`` set, an :class:`~ddcore.seeding.EpochSeeding` is attached and added to
    ``load_dict`` under ``rng``, and an engine's ``grad_scaler`` (fp16) under ``grad_scaler``; the saver of the
    same stage shares the dict, so both are saved with the networks, optimisers and the engine's counters. An
    older checkpoint lacking such a non-module entry resumes with a warning.

    Args:
        checkpoint_dir: folder of the ``AtomicCheckpointSaver``.
        load_dict: objects to restore, same keys as the saver's ``save_dict``.
        file_prefix: the saver's ``file_prefix``.
        enabled: ``False`` disables resuming (always start afresh).
        engine_key: the engine this handler is attached to is restored from this checkpoint entry.
        seed: the run's seed; attaches :class:`~ddcore.seeding.EpochSeeding` (``None``: no per-epoch seeding).
        seed_stream: the :class:`~ddcore.seeding.EpochSeeding` stream of this trainer (``None``: 0).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        load_dict: dict,
        file_prefix: str = "",
        enabled: bool = True,
        engine_key: str | None = "trainer",
        seed: int | None = None,
        seed_stream: int | None = None,
    ) -> None:
        self.engine_key = engine_key
        self.seeding = None if seed is None else EpochSeeding(seed, seed_stream or 0)
        self._entries: set[str] | None = None
        self.checkpoint_dir = Path(checkpoint_dir)
        self.load_dict = load_dict
        self.file_prefix = file_prefix
        self.enabled = enabled
        self.resumed_from: Path | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``Events.STARTED`` of ``engine``.

        Args:
            engine: the trainer.
        """
        if self.engine_key is not None:
            self.load_dict[self.engine_key] = engine
        if self.seeding is not None:
            self.load_dict["rng"] = self.seeding
            self.seeding.attach(engine)
        if getattr(engine, "grad_scaler", None) is not None:
            self.load_dict["grad_scaler"] = engine.grad_scaler
        engine.add_event_handler(Events.STARTED, self)

    def check(self) -> Path | None:
        """Find the newest readable checkpoint and check it against ``load_dict`` without loading it.

        Returns:
            The checkpoint to resume from, or ``None``.

        Raises:
            ValueError: when a module's tensors do not match the checkpoint, or no checkpoint can be read.
        """
        if not self.enabled:
            return None
        found = load_latest_checkpoint(self.checkpoint_dir, self.file_prefix)
        if found is None:
            return None
        path, checkpoint = found
        self._entries = set(checkpoint)
        for name, obj in self.load_dict.items():
            if isinstance(obj, nn.Module):
                if name not in checkpoint:
                    raise ValueError(f"Checkpoint '{path}' has no '{name}' entry; it was written by another setup.")
                check_state_dict(obj, checkpoint[name], str(path), f"'{name}'")
        return path

    def __call__(self, engine: Engine) -> None:
        """Restore the newest readable checkpoint into ``load_dict`` (and the engine state).

        Args:
            engine: the trainer.
        """
        path = self.check()
        if path is None:
            return
        absent = [k for k in self.load_dict if self._entries is not None and k not in self._entries]
        if absent:
            message = f"checkpoint {path} has no {absent} entries (an older checkpoint); they start afresh"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logger.warning(message)
        load_dict = {k: v for k, v in self.load_dict.items() if k not in absent}
        CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location="cpu")(engine)
        self.resumed_from = path
        logger.info(f"resumed from {path} (epoch {engine.state.epoch}, iteration {engine.state.iteration})")

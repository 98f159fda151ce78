"""Ignite/MONAI handlers used by the DAMM engines: atomic checkpoints, resume, progress bars, log helpers.

Checkpoints are written by MONAI's :class:`~monai.handlers.CheckpointSaver`; :class:`AtomicCheckpointSaver` only
swaps its disk writer for one that goes through :func:`ddcore.atomic.atomic_torch_save` (MONAI builds ignite's
``DiskSaver`` with ``atomic=False``). :class:`ResumeFromCheckpoint` finds the newest checkpoint of a folder and
restores it with MONAI's :class:`~monai.handlers.CheckpointLoader`, after checking that every tensor has the shape
the current configuration expects, so a checkpoint from another configuration fails before any training.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from ddcore.atomic import atomic_torch_save

__all__ = [
    "AtomicCheckpointSaver",
    "ProgressBar",
    "ResumeFromCheckpoint",
    "check_state_dict",
    "every_n_iterations",
    "is_rank_zero",
    "latest_checkpoint",
    "load_checked_state_dict",
    "scalar_logs",
]

logger = logging.getLogger(__name__)

_CKPT_NUMBER = re.compile(r"(?:epoch|iteration)=(\d+)")


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or the only process).

    Returns:
        ``True`` outside ``torch.distributed`` or on rank 0.
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def scalar_logs(output: Any) -> dict[str, float]:
    """Turn an engine output dict into ``{name: float}`` for ``StatsHandler``/``TensorBoardStatsHandler``.

    Args:
        output: ``engine.state.output`` of a DAMM trainer (a dict of scalars or 0-d tensors).

    Returns:
        Only the scalar entries, as floats.
    """
    if not isinstance(output, Mapping):
        return {}
    logs = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.detach().item()
        if isinstance(value, (int, float)):
            logs[str(key)] = float(value)
    return logs


def every_n_iterations(n: int) -> Callable[[Engine, int], bool]:
    """Ignite event filter firing every ``n``-th iteration (for ``StatsHandler(iteration_log=...)``).

    Args:
        n: period in iterations (>= 1).

    Returns:
        ``filter(engine, event) -> bool``.

    Raises:
        ValueError: if ``n < 1``.
    """
    if int(n) < 1:
        raise ValueError(f"every_n_iterations: n must be >= 1, got {n}.")
    n = int(n)

    def _filter(engine: Engine, event: int) -> bool:
        return event % n == 0

    return _filter


def latest_checkpoint(folder: str | Path, prefix: str = "") -> Path | None:
    """The checkpoint with the highest epoch/iteration number in ``folder``.

    Args:
        folder: a ``CheckpointSaver`` folder.
        prefix: the saver's ``file_prefix`` (files are ``{prefix}_checkpoint_epoch=N.pt``).

    Returns:
        The newest checkpoint file, or ``None`` when there is none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for path in folder.glob(f"{prefix}*checkpoint*.pt"):
        match = _CKPT_NUMBER.search(path.name)
        if match is None:
            continue
        number = int(match.group(1))
        if best is None or number > best[0]:
            best = (number, path)
    return None if best is None else best[1]


def check_state_dict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str = "model"
) -> None:
    """Check that ``state`` has exactly the keys and tensor shapes of ``module``.

    Args:
        module: the module the state will be loaded into.
        state: a state dict.
        source: where the state comes from (a file path), for the message.
        what: what the module is ("autoencoder 'vessel'", "denoiser"), for the message.

    Raises:
        ValueError: naming the file, up to five offending keys with both shapes, and what to do.
    """
    expected = module.state_dict()
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
    module: torch.nn.Module, path: str | Path, what: str = "model", key: str | None = None
) -> dict[str, Any]:
    """Load a plain tensor-dict checkpoint into ``module`` after :func:`check_state_dict`.

    Args:
        module: destination module.
        path: checkpoint file (``torch.load(..., weights_only=True)``).
        what: description for error messages.
        key: if given, the module state is ``checkpoint[key]``.

    Returns:
        The whole loaded checkpoint dict.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the checkpoint does not match the configured module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint for the {what} not found: '{path}'.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint if key is None else checkpoint.get(key)
    if not isinstance(state, Mapping):
        raise ValueError(f"Checkpoint '{path}' has no '{key}' entry holding the {what} state dict.")
    check_state_dict(module, state, str(path), what)
    module.load_state_dict(state, strict=True)
    return checkpoint


class _AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` writing through :func:`ddcore.atomic.atomic_torch_save` (temp file + rename)."""

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        atomic_torch_save(checkpoint, path)

    def remove(self, filename: str) -> None:
        path = self.dirname / (self.filename or filename)
        if is_rank_zero() and path.exists():
            path.unlink()


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI :class:`~monai.handlers.CheckpointSaver` whose files are written atomically (temp file, then rename).

    Same arguments as ``CheckpointSaver``; only the disk writer changes, so an interrupted run never leaves a
    truncated checkpoint that :class:`ResumeFromCheckpoint` would pick up. With ``engine_key`` set, the engine
    the handler is attached to is added to ``save_dict`` under that key (its epoch/iteration counters are saved,
    and a bundle config needs no circular reference from the trainer's handlers back to the trainer).
    """

    def __init__(self, save_dir: str, save_dict: dict, engine_key: str | None = "trainer", **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        self.engine_key = engine_key
        for attr, filename in (
            ("_final_checkpoint", self._final_filename),
            ("_key_metric_checkpoint", kwargs.get("key_metric_filename")),
            ("_interval_checkpoint", None),
        ):
            ckpt = getattr(self, attr)
            if ckpt is not None:
                ckpt.save_handler = _AtomicDiskSaver(save_dir, filename)

    def attach(self, engine: Engine) -> None:
        """Add ``engine`` to ``save_dict`` (under ``engine_key``) and register the saving events.

        Args:
            engine: the trainer.
        """
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine
        super().attach(engine)


class ResumeFromCheckpoint:
    """Resume an engine from the newest checkpoint of a folder (no-op when the folder holds none).

    Attach it to a trainer before running: at ``STARTED`` it looks for the newest ``*checkpoint_epoch=N.pt``
    written by :class:`AtomicCheckpointSaver`, checks every module's tensor shapes against the current
    configuration (clear ``ValueError`` otherwise) and restores all objects of ``load_dict`` (networks,
    optimisers, the engine's epoch/iteration counters) with MONAI's ``CheckpointLoader``.

    Args:
        checkpoint_dir: folder of the ``AtomicCheckpointSaver``.
        load_dict: objects to restore, same keys as the saver's ``save_dict``.
        file_prefix: the saver's ``file_prefix``.
        enabled: ``False`` disables resuming (always start afresh).
        engine_key: the engine this handler is attached to is restored from this checkpoint entry.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        load_dict: dict,
        file_prefix: str = "",
        enabled: bool = True,
        engine_key: str | None = "trainer",
    ) -> None:
        self.engine_key = engine_key
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
        engine.add_event_handler(Events.STARTED, self)

    def check(self) -> Path | None:
        """Find the newest checkpoint and check it against ``load_dict`` without loading it.

        Returns:
            The checkpoint to resume from, or ``None``.

        Raises:
            ValueError: when a module's tensors do not match the checkpoint.
        """
        if not self.enabled:
            return None
        path = latest_checkpoint(self.checkpoint_dir, self.file_prefix)
        if path is None:
            return None
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        for name, obj in self.load_dict.items():
            if isinstance(obj, torch.nn.Module):
                if name not in checkpoint:
                    raise ValueError(f"Checkpoint '{path}' has no '{name}' entry; it was written by another setup.")
                check_state_dict(obj, checkpoint[name], str(path), f"'{name}'")
        return path

    def __call__(self, engine: Engine) -> None:
        """Restore the newest checkpoint into ``load_dict`` (and the engine state).

        Args:
            engine: the trainer.
        """
        path = self.check()
        if path is None:
            return
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location="cpu")(engine)
        self.resumed_from = path
        logger.info(f"resumed from {path} (epoch {engine.state.epoch}, iteration {engine.state.iteration})")


class ProgressBar:
    """A tqdm progress bar over an engine's iterations (ignite's ``ProgressBar``), shown on rank 0 only.

    Args:
        output_transform: maps ``engine.state.output`` to a dict of scalars shown next to the bar
            (default :func:`scalar_logs` restricted to ``keys``).
        keys: output keys to show (``None``: all scalars).
        persist: keep the bar after each epoch.
        disable: hide the bar (e.g. in tests or non-interactive logs).
    """

    def __init__(
        self,
        output_transform: Callable[[Any], Any] | None = None,
        keys: list[str] | None = None,
        persist: bool = False,
        disable: bool = False,
    ) -> None:
        self.keys = keys
        self.output_transform = output_transform
        self.persist = persist
        self.disable = disable

    def _transform(self, output: Any) -> dict[str, float]:
        logs = scalar_logs(output if self.output_transform is None else self.output_transform(output))
        return {k: v for k, v in logs.items() if self.keys is None or k in self.keys}

    def attach(self, engine: Engine) -> None:
        """Attach an ignite ``ProgressBar`` to ``engine`` (rank 0 only, unless disabled).

        Args:
            engine: trainer or evaluator.
        """
        if self.disable or not is_rank_zero():
            return
        from ignite.handlers import ProgressBar as _IgniteProgressBar

        _IgniteProgressBar(persist=self.persist).attach(engine, output_transform=self._transform)

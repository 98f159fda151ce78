"""Resumable training stages: train unless the stage already finished, then export its final model.

The bundle's ``train.json`` runs two :class:`TrainingStage` objects (the autoencoders, then the denoiser);
resuming an interrupted stage comes from :class:`ddcore.checkpoints.ResumeFromCheckpoint` on the trainer.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from damm.distributed import barrier, rank_zero_info
from ddcore.atomic import remove_stale_temporaries
from ddcore.device import is_rank_zero

__all__ = ["TRAINING_TIMES", "TrainingStage", "read_training_times", "record_training_time"]

logger = logging.getLogger(__name__)

#: file beside the final models recording how long each stage trained (seconds and iterations)
TRAINING_TIMES = "training_times.json"


def record_training_time(models_dir: str | Path, stage: str, seconds: float, iterations: int | None) -> Path:
    """Record a finished stage's training time in ``<models_dir>/training_times.json`` (atomic; rank 0).

    Args:
        models_dir: the folder of the final models.
        stage: the stage's name.
        seconds: wall-clock training time.
        iterations: iterations trained (``None`` when unknown).

    Returns:
        The file's path.
    """
    from ddcore.atomic import atomic_write_json

    path = Path(models_dir) / TRAINING_TIMES
    if is_rank_zero():
        times = read_training_times(models_dir)
        times[stage] = {"seconds": float(seconds), "iterations": iterations}
        atomic_write_json(times, path)
    return path


def read_training_times(models_dir: str | Path) -> dict[str, Any]:
    """The recorded training times (``{}`` when none).

    Args:
        models_dir: the folder of the final models.

    Returns:
        ``{stage: {"seconds", "iterations"}}``.
    """
    import json

    path = Path(models_dir) / TRAINING_TIMES
    return json.loads(path.read_text()) if path.is_file() else {}


class TrainingStage:
    """Run one training stage unless it already finished; export its final model when it completes.

    Resuming an interrupted stage is done by the trainer's :class:`ddcore.checkpoints.ResumeFromCheckpoint` handler;
    this class decides whether to train at all: when ``final_path`` exists and ``retrain`` is false the stage is
    skipped (``retrain=True`` deletes the stage's checkpoints and trains from scratch).

    Args:
        name: stage name for the log.
        trainer: the ignite trainer.
        final_path: the stage's final model file; its presence marks the stage as finished.
        export: called after a successful ``trainer.run()`` to write ``final_path``.
        retrain: train again even if finished.
        checkpoint_dir: the stage's checkpoint folder (emptied when retraining).
        prepare: optional callables run before training (e.g. load the autoencoders for stage 2).
        check: optional callable run instead of training when the stage is finished; it should load the final
            model so a checkpoint from another configuration fails here, clearly, before later stages.
    """

    def __init__(
        self,
        name: str,
        trainer: Any,
        final_path: str | Path,
        export: Callable[[], Any],
        retrain: bool = False,
        checkpoint_dir: str | Path | None = None,
        prepare: Sequence[Callable[[], Any]] = (),
        check: Callable[[], Any] | None = None,
    ) -> None:
        self.name = name
        self.trainer = trainer
        self.final_path = Path(final_path)
        self.export = export
        self.retrain = bool(retrain)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.prepare = list(prepare)
        self.check = check

    def finished(self) -> bool:
        """Whether the stage's final model exists.

        Returns:
            ``True`` if ``final_path`` is a file.
        """
        return self.final_path.is_file()

    def run(self) -> bool:
        """Train (or skip) the stage.

        Returns:
            ``True`` if the stage trained, ``False`` if it was skipped.
        """
        if self.finished() and not self.retrain:
            if self.check is not None:
                self.check()
            rank_zero_info(
                logger,
                f"{self.name}: already finished ({self.final_path}); skipping. Set the retrain flag to train again.",
            )
            return False
        if self.retrain and self.checkpoint_dir is not None and self.checkpoint_dir.is_dir() and is_rank_zero():
            shutil.rmtree(self.checkpoint_dir)
            rank_zero_info(logger, f"{self.name}: retraining from scratch (removed {self.checkpoint_dir})")
        if is_rank_zero():  # a killed export's half-written final model
            remove_stale_temporaries(self.final_path.parent, self.final_path.stem)
        barrier()
        for step in self.prepare:
            step()
        t0 = time.perf_counter()
        rank_zero_info(logger, f"{self.name}: training")
        self.trainer.run()
        self.export()
        seconds = time.perf_counter() - t0
        state = getattr(self.trainer, "state", None)
        record_training_time(self.final_path.parent, self.name, seconds, getattr(state, "iteration", None))
        rank_zero_info(logger, f"{self.name}: done in {seconds:.1f} s -> {self.final_path}")
        return True

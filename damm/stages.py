"""Resumable training stages: train unless the stage already finished, then export its final model.

The bundle's ``train.json`` runs two :class:`TrainingStage` objects (the autoencoders, then the denoiser);
resuming an interrupted stage comes from :class:`ddcore.checkpoints.ResumeFromCheckpoint` on the trainer. A stage
counts as finished for the budget it was trained for (recorded in ``training_times.json``): raising the iteration
budget of a finished stage resumes it from its last checkpoint up to the new budget.
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

__all__ = ["TRAINING_TIMES", "TrainingStage", "budget_reached", "read_training_times", "record_training_time"]

logger = logging.getLogger(__name__)

#: file beside the final models recording how long each stage trained (seconds and iterations)
TRAINING_TIMES = "training_times.json"


def record_training_time(
    models_dir: str | Path, stage: str, seconds: float, iterations: int | None, budget: int | None = None
) -> Path:
    """Record a finished stage's training time in ``<models_dir>/training_times.json`` (atomic; rank 0).

    Args:
        models_dir: the folder of the final models.
        stage: the stage's name.
        seconds: wall-clock training time.
        iterations: iterations trained (``None`` when unknown).
        budget: the iteration budget the stage was trained for (``None`` when none was set); a wall-clock cap can
            stop a stage below it.

    Returns:
        The file's path.
    """
    from ddcore.atomic import atomic_write_json

    path = Path(models_dir) / TRAINING_TIMES
    if is_rank_zero():
        times = read_training_times(models_dir)
        times[stage] = {"seconds": float(seconds), "iterations": iterations, "budget": budget}
        atomic_write_json(times, path)
    return path


def read_training_times(models_dir: str | Path) -> dict[str, Any]:
    """The recorded training times (``{}`` when none).

    Args:
        models_dir: the folder of the final models.

    Returns:
        ``{stage: {"seconds", "iterations", "budget"}}``.
    """
    import json

    path = Path(models_dir) / TRAINING_TIMES
    return json.loads(path.read_text()) if path.is_file() else {}


def budget_reached(models_dir: str | Path, stage: str, budget: int | None) -> bool:
    """Whether a stage's recorded training covers the iteration ``budget``.

    Args:
        models_dir: the folder of the final models.
        stage: the stage's name.
        budget: the current iteration budget (``None``: any recorded training covers it).

    Returns:
        ``True`` when ``budget`` is ``None``, when nothing is recorded for the stage (a final model from elsewhere
        counts as finished), or when the recorded budget (else the recorded iterations) is at least ``budget``.
    """
    entry = read_training_times(models_dir).get(stage)
    if budget is None or not entry:
        return True
    done = entry.get("budget") if entry.get("budget") is not None else entry.get("iterations")
    return done is None or int(done) >= int(budget)


class TrainingStage:
    """Run one training stage unless it already finished; export its final model when it completes.

    Resuming an interrupted stage is done by the trainer's :class:`ddcore.checkpoints.ResumeFromCheckpoint` handler;
    this class decides whether to train at all: when ``final_path`` exists, the stage was trained for at least
    ``iterations`` (:func:`budget_reached`) and ``retrain`` is false, the stage is skipped (``retrain=True`` deletes
    the stage's checkpoints and trains from scratch). A final model trained for a smaller budget is kept until the
    resumed run exports the new one.

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
        iterations: the stage's iteration budget (``None``: the final model alone marks the stage finished).
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
        iterations: int | None = None,
    ) -> None:
        self.name = name
        self.trainer = trainer
        self.final_path = Path(final_path)
        self.export = export
        self.retrain = bool(retrain)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.prepare = list(prepare)
        self.check = check
        self.iterations = None if iterations is None else int(iterations)

    def finished(self) -> bool:
        """Whether the stage's final model exists and was trained for the current budget.

        Returns:
            ``True`` if ``final_path`` is a file and :func:`budget_reached`.
        """
        return self.final_path.is_file() and budget_reached(self.final_path.parent, self.name, self.iterations)

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
        earlier = 0.0  # a resumed budget's training time adds to the recorded one
        if self.final_path.is_file() and not self.retrain:
            earlier = float(read_training_times(self.final_path.parent).get(self.name, {}).get("seconds") or 0.0)
            rank_zero_info(
                logger,
                f"{self.name}: {self.final_path} was trained for fewer than {self.iterations} iterations; resuming "
                "from the last checkpoint up to the new budget.",
            )
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
        seconds = time.perf_counter() - t0 + earlier
        state = getattr(self.trainer, "state", None)
        iteration = getattr(state, "iteration", None)
        record_training_time(self.final_path.parent, self.name, seconds, iteration, self.iterations)
        rank_zero_info(logger, f"{self.name}: done in {seconds:.1f} s -> {self.final_path}")
        return True

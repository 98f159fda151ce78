"""Iteration budgets of the training stages: the count that ends a stage, whatever the machine's speed.

A stage's budget is an iteration count (``ae_iterations``, ``dm_iterations``), so a result does not depend on how
busy the machine was. The trainer's ``max_epochs`` is derived from it (:func:`epochs_for`, the epochs that hold
the budget) and :class:`IterationBudget` ends the last, partial epoch exactly at the count (the epoch then
completes normally, so the epoch-level checkpoint and every epoch handler still run). A wall-clock limit
(:class:`damm.tasks.common.TimeBudget`) may remain as a safety cap, never as the default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sized
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["IterationBudget", "epochs_for", "fraction_of"]

logger = logging.getLogger(__name__)


def _length(loader: Any) -> int:
    if isinstance(loader, Sized):
        return len(loader)
    return int(loader)


def epochs_for(iterations: int, loader: Any) -> int:
    """The number of epochs that holds ``iterations`` iterations of ``loader``.

    Args:
        iterations: the stage's iteration budget (``>= 1``).
        loader: the training data loader (or its length, iterations per epoch).

    Returns:
        ``ceil(iterations / len(loader))``.

    Raises:
        ValueError: a budget below 1 or an empty loader (naming the budget).
    """
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError(f"iteration budget must be >= 1, got {iterations}")
    per_epoch = _length(loader)
    if per_epoch < 1:
        raise ValueError(
            f"the training loader yields no batch (iteration budget {iterations}): fewer items than the batch size?"
        )
    return math.ceil(iterations / per_epoch)


def fraction_of(fraction: float, iterations: int, name: str = "fraction") -> int:
    """``round(fraction * iterations)``: an iteration (e.g. the divergence-aware phase's start) as a share of a budget.

    Args:
        fraction: in ``[0, 1]``.
        iterations: the budget.
        name: the setting's name for the error message.

    Returns:
        The iteration.

    Raises:
        ValueError: a fraction outside ``[0, 1]``.
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {fraction}")
    return round(float(fraction) * int(iterations))


class IterationBudget:
    """End training exactly after ``iterations`` iterations (the epoch is closed normally, so it is checkpointed).

    Args:
        iterations: the budget; ``None`` or ``<= 0`` disables it.
        name: stage name for the log.
    """

    def __init__(self, iterations: int | None, name: str | None = None) -> None:
        self.iterations = None if iterations is None or int(iterations) <= 0 else int(iterations)
        self.name = name or "training"
        self.stopped_at_iteration: int | None = None

    def attach(self, engine: Engine) -> None:
        """Register with ``engine`` (MONAI trainers call this for every train handler).

        Args:
            engine: the trainer.
        """
        if self.iterations is None:
            return
        engine.add_event_handler(Events.STARTED, self._check_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _check_started(self, engine: Engine) -> None:
        if engine.state.iteration >= self.iterations:  # resumed from a checkpoint at or past the budget
            self.stopped_at_iteration = int(engine.state.iteration)
            engine.terminate()

    def _check(self, engine: Engine) -> None:
        if engine.state.iteration < self.iterations:
            return
        self.stopped_at_iteration = int(engine.state.iteration)
        epoch_length = engine.state.epoch_length or 0
        if (
            epoch_length
            and engine.state.iteration % epoch_length == 0
            and engine.state.epoch >= engine.state.max_epochs
        ):
            return  # the last epoch ends here anyway
        logger.info(f"{self.name}: iteration budget {self.iterations} reached")
        if engine.state.epoch >= (engine.state.max_epochs or 0):
            engine.terminate_epoch()  # the epoch completes (checkpoint, epoch handlers); max_epochs ends the run
        else:  # max_epochs holds more than the budget (e.g. set by hand): stop now
            engine.terminate()

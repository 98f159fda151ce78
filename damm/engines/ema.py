"""Exponential moving average of the denoiser's weights (used for sampling), and snapshots during training.

:class:`WeightEMA` keeps ``torch.optim.swa_utils.AveragedModel`` copy of a network updated after every training
iteration with the warm-up decay of the diffusers pattern, ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th
update, so early averages are not dominated by the random initialisation. Its ``averaged`` module is part of the
stage-2 checkpoint (so a resumed run continues the same average) and the exported model carries the averaged
weights (:func:`damm.model.export_model` with ``ema``): sampling, evaluation and inference use them.

:class:`Snapshots` calls a writer at chosen iterations (e.g. the model at 25 % and 50 % of the budget, for a
quality-against-iterations curve from one run).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMAUpdate", "Snapshots", "WeightEMA", "ema_decay_at"]

logger = logging.getLogger(__name__)


def ema_decay_at(decay: float, num_updates: int) -> float:
    """The decay used at an update: ``min(decay, (1 + n) / (10 + n))``, ``n`` the updates done before it.

    Args:
        decay: the target decay in ``[0, 1)``.
        num_updates: updates already applied.

    Returns:
        The effective decay.
    """
    n = int(num_updates)
    return min(float(decay), (1.0 + n) / (10.0 + n))


class WeightEMA:
    """EMA of ``network``'s parameters and buffers, updated after each iteration of the engine it is attached to.

    Args:
        network: the trained module (the raw denoiser, not a DDP wrapper).
        decay: target decay (``0`` or ``None`` disables the average: :attr:`enabled` is false and nothing is
            updated; the bundle's ``dm_ema_decay``).
        update_every: update once every this many iterations.

    Raises:
        ValueError: a decay outside ``[0, 1)`` or ``update_every < 1``.
    """

    def __init__(self, network: nn.Module, decay: float | None = None, update_every: int = 1) -> None:
        decay = 0.0 if decay is None else decay
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"dm_ema_decay must lie in [0, 1), got {decay}")
        if int(update_every) < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        self.network = network
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.enabled = self.decay > 0.0

        def _avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
            d = ema_decay_at(self.decay, int(num_averaged))
            return averaged * d + current.detach() * (1.0 - d)

        self.averaged = AveragedModel(network, avg_fn=_avg, use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def num_updates(self) -> int:
        """Updates applied so far (restored with the checkpoint)."""
        return int(self.averaged.n_averaged)

    def attach(self, engine: Engine) -> None:
        """Update after every ``update_every``-th iteration of ``engine``.

        Args:
            engine: the trainer.
        """
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.update_every), self._update)

    def _update(self, engine: Engine) -> None:
        self.update()

    @torch.no_grad()
    def update(self) -> None:
        """One EMA update from the network's current weights (the first copies them)."""
        self.averaged.update_parameters(self.network)

    def state_dict_for(self, module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
        """``module``'s state dict with the averaged weights of the network in place of its own.

        Args:
            module: a module holding the network (or the network itself).
            prefix: the network's prefix inside ``module`` (``"denoiser."`` for :class:`damm.model.DAMMModel`).

        Returns:
            CPU tensors; ``module`` is unchanged. Without an average yet (or disabled) the current weights.
        """
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        if self.enabled and self.num_updates > 0:
            for key, value in self.averaged.module.state_dict().items():
                state[prefix + key] = value.detach().cpu().clone()
        return state

    @torch.no_grad()
    def copy_to(self, network: nn.Module | None = None) -> bool:
        """Load the averaged weights into ``network`` (default: the trained network).

        Args:
            network: destination module of the same architecture.

        Returns:
            Whether weights were copied (false when disabled or before the first update).
        """
        if not (self.enabled and self.num_updates > 0):
            return False
        target = self.network if network is None else network
        target.load_state_dict(copy.deepcopy(self.averaged.module.state_dict()))
        return True


class EMAUpdate:
    """Train handler that updates a :class:`WeightEMA` after each iteration (the config's handler entry; the
    average itself is defined once, ``train#ema``, and also saved in the checkpoint).

    Args:
        ema: the average.
    """

    def __init__(self, ema: WeightEMA) -> None:
        self.ema = ema

    def attach(self, engine: Engine) -> None:
        """Register the update with ``engine``.

        Args:
            engine: the trainer.
        """
        self.ema.attach(engine)


class Snapshots:
    """Call ``write(iteration)`` when the engine completes each of the given iterations.

    Args:
        iterations: iteration counts (values ``<= 0`` are ignored).
        write: called with the iteration.
        name: for the log.
    """

    def __init__(self, iterations: Iterable[int], write: Callable[[int], Any], name: str | None = None) -> None:
        self.iterations = sorted({int(i) for i in iterations if int(i) > 0})
        self.write = write
        self.name = name or "training"
        self.written: list[int] = []

    def attach(self, engine: Engine) -> None:
        """Register with ``engine``.

        Args:
            engine: the trainer.
        """
        if self.iterations:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _check(self, engine: Engine) -> None:
        it = int(engine.state.iteration)
        if it in self.iterations:
            self.write(it)
            self.written.append(it)
            logger.info(f"{self.name}: snapshot at iteration {it}")

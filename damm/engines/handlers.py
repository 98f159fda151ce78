"""Ignite handlers and log helpers of the DAMM engines: progress bars, scalar logs, iteration filters.

Checkpoint saving, discovery, checked loading and resuming are shared with DRDM and live in
:mod:`ddcore.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine

from ddcore.device import is_rank_zero

__all__ = ["ProgressBar", "every_n_iterations", "scalar_logs"]


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

"""Timing and figure-record helpers shared by every benchmark module.

Benchmark modules (``benchmarks/<name>.py``) expose ``NAME: str`` and ``run(quick: bool) -> list[dict]``;
each dict is a *figure* made with :func:`figure`. The runner (``python -m benchmarks run``) collects them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["figure", "time_call"]


def time_call(fn: Callable[[], Any], warmup: int = 1, repeat: int = 5) -> tuple[float, float]:
    """Time ``fn`` after ``warmup`` calls; return the median and the spread (max - min) in seconds.

    Args:
        fn: zero-argument callable to time.
        warmup: untimed calls first (allocator, caches, lazy init).
        repeat: timed calls.

    Returns:
        ``(median_seconds, spread_seconds)``.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (max(times) - min(times))


def figure(
    name: str,
    value: float,
    unit: str,
    spread: float | None = None,
    reference: float | None = None,
    reference_label: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Build one benchmark figure record.

    Args:
        name: what was measured, e.g. ``"drdm forward 3D 128^3 t=79 (binary)"``.
        value: the measured value.
        unit: its unit (``"s"``, ``"samples/s"``, ``"GFLOP/s"``, ``"dB"``, ``"%"``...).
        spread: max - min over repeats (same unit), if repeated.
        reference: the value it is compared against (paper, official code, baseline), if any.
        reference_label: where the reference comes from.
        **params: settings of the measurement (sizes, batch, steps...).

    Returns:
        A JSON-serialisable dict; ``ratio`` = value / reference when a reference is given.
    """
    rec: dict[str, Any] = {"name": name, "value": float(value), "unit": unit}
    if spread is not None:
        rec["spread"] = float(spread)
    if reference is not None:
        rec["reference"] = float(reference)
        rec["reference_label"] = reference_label
        rec["ratio"] = float(value) / float(reference) if reference else None
    if params:
        rec["params"] = params
    return rec

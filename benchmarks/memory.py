"""Peak-memory measurement of one callable (CPU resident-set growth, or CUDA peak allocation)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["peak_memory_mb"]


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so RSS growth shows the next call's own peak."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(name).malloc_trim(0)


def peak_memory_mb(fn: Callable[[], Any], interval_s: float = 0.002) -> float:
    """Memory that ``fn`` needs beyond what is allocated when it starts, in MiB.

    On CPU a sampler thread polls the resident set every ``interval_s`` while ``fn`` runs (torch kernels release
    the GIL, so the sampler keeps running); the result is the peak minus the starting value, after freed heap
    memory has been handed back to the OS (otherwise a warm heap hides the growth). Forking a child instead would
    deadlock in OpenMP once torch has started its thread pool. On CUDA it is
    ``torch.cuda.max_memory_allocated``.

    Args:
        fn: zero-argument callable.
        interval_s: sampling period on CPU.

    Returns:
        Peak additional memory in MiB (a lower bound on CPU: spikes shorter than the period can be missed).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _release_free_heap()
    start = _current_rss_mb()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss_mb())
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0.0, max(peak[0], _current_rss_mb()) - start)

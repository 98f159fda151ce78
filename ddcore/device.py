"""Where a module and a process run: the device of a module's weights, whether this is the main process, and how many
CPU threads torch should use (``num_threads`` of every bundle config)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["is_rank_zero", "module_device", "physical_cores", "set_num_threads"]

logger = logging.getLogger(__name__)


def module_device(module: nn.Module) -> torch.device:
    """The device of a module: that of its first parameter, else of its first buffer, else the CPU.

    Args:
        module: any module (a parameter-free one, e.g. a fixed filter, is reported on the CPU unless it has
            buffers).

    Returns:
        The device its tensors live on.
    """
    for param in module.parameters():
        return param.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of ``torch.distributed`` (or the only process).

    Returns:
        ``True`` outside ``torch.distributed`` or on rank 0.
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def physical_cores() -> int:
    """The physical CPU cores this process may run on (hyper-threads counted once).

    Reads the core topology of Linux's sysfs for the CPUs in the process's affinity mask; elsewhere (or when
    sysfs is unreadable) the number of usable logical CPUs.

    Returns:
        At least 1.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def set_num_threads(num_threads: int | None) -> int:
    """Set torch's intra-op CPU threads (the bundle's ``num_threads``).

    ``0`` (or ``None``) keeps torch's default: ``OMP_NUM_THREADS`` when it is set, else the physical cores
    (:func:`physical_cores`), so a caller that pinned the threads (a test, a job scheduler) is not overridden. On a
    busy machine fewer threads than cores is faster: with 2 threads on a loaded 2-core machine training ran 2-13x
    slower than with 1 (OpenMP spin-waits), so pass ``--num_threads 1`` there.

    Args:
        num_threads: threads, ``>= 0``.

    Returns:
        The number in use.

    Raises:
        ValueError: a negative value.
    """
    if num_threads in (None, 0):
        n = torch.get_num_threads()
    else:
        n = int(num_threads)
        if n < 1:
            raise ValueError(f"num_threads must be >= 0 (0: torch's default, the physical cores), got {num_threads}")
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    logger.debug(f"torch CPU threads: {n}")
    return n

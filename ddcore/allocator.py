"""The C heap under torch's CPU tensors: keep freed blocks for reuse instead of returning them to the kernel.

torch's CPU allocator takes every tensor from ``malloc``. glibc serves a block above its mmap threshold (128 KiB at
start, raised dynamically up to 32 MiB) with a fresh ``mmap`` and hands it back with ``munmap`` when it is freed,
and it trims the top of the heap once more than 128 KiB there is free. A training step allocates and frees the
same few hundred MiB every iteration (autocast copies of the weights, gradients, activations), so the kernel maps,
zero-fills and unmaps those pages again each step (``benchmarks.damm_train_levers`` reports the minor page faults
per step and the time with and without this setting). Raising the mmap threshold to its 32 MiB maximum and the
trim threshold to 1 GiB keeps those blocks in the heap, where the next step reuses them.

The cost: memory freed by the process stays mapped to it (its resident size stays at its peak), which is what a
training or sampling loop wants and a short command does not notice. It is the bundle's ``cpu_keep_freed_memory``
(on by default). Outside glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_memory"]

logger = logging.getLogger(__name__)

#: glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks up to this size come
#: from the heap.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: Free memory at the top of the heap kept before trimming it back to the kernel.
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # not glibc (musl has no gnu_get_libc_version)
    return libc


def keep_freed_memory(enabled: bool = True) -> bool:
    """Make glibc keep freed tensor memory for reuse (see the module docstring).

    Call it once at the start of a process (the bundle configs' ``initialize``); later calls change nothing
    more. Blocks that are already mapped keep their mapping until they are freed.

    Args:
        enabled: ``False`` does nothing (the bundle's ``cpu_keep_freed_memory: false``).

    Returns:
        Whether the setting took effect (``False`` when disabled, outside glibc, or when glibc refused it).
    """
    if not enabled:
        return False
    libc = _libc()
    if libc is None:
        logger.debug("keep_freed_memory: not glibc, allocator unchanged")
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    logger.debug(f"keep_freed_memory: mmap {MMAP_THRESHOLD_BYTES} B, trim {TRIM_THRESHOLD_BYTES} B, applied: {ok}")
    return ok

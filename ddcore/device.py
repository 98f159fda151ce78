"""Where a module and a process run: the device of a module's weights, and whether this is the main process."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_rank_zero", "module_device"]


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

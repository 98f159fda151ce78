"""Distributed-training helpers the bundle configs call: a safe barrier, DDP wrappers, rank-0 logging.

Every rank runs the same stages under ``torch.distributed`` (``multi_gpu_train.json``); outside it these helpers
are no-ops or plain wrappers, so single-process runs use the same code.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ddcore.device import is_rank_zero

__all__ = ["barrier", "ddp_forward_all", "ddp_modules", "rank_zero_info"]


def rank_zero_info(logger: logging.Logger, message: str) -> None:
    """Log ``message`` at INFO level on rank 0 only (every rank runs the same stages under DDP).

    Args:
        logger: the calling module's logger.
        message: the message.
    """
    if is_rank_zero():
        logger.info(message)


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is initialised; otherwise nothing."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _ddp(module: nn.Module, device: torch.device | str, find_unused_parameters: bool) -> nn.Module:
    device = torch.device(device)
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module.to(device), device_ids=ids, find_unused_parameters=find_unused_parameters
    )


def ddp_modules(
    modules: nn.ModuleDict, device: torch.device | str, find_unused_parameters: bool = True
) -> nn.ModuleDict:
    """Wrap every module of a ``ModuleDict`` in ``DistributedDataParallel`` (gloo on CPU, NCCL on GPUs).

    The wrapped dict is what the trainer uses; checkpoints keep referring to the unwrapped modules.

    Args:
        modules: e.g. the per-modality autoencoders or discriminators.
        device: this rank's device.
        find_unused_parameters: needed when some parameters get no gradient in a step.

    Returns:
        A ``ModuleDict`` of DDP wrappers (same keys).
    """
    return nn.ModuleDict({k: _ddp(m, device, find_unused_parameters) for k, m in modules.items()})


def ddp_forward_all(denoiser: nn.Module, device: torch.device | str, find_unused_parameters: bool = True) -> nn.Module:
    """``DistributedDataParallel(ForwardAll(denoiser))``: DDP over the denoiser's ``forward_all`` (both branches).

    ``find_unused_parameters`` is needed: the confidence head gets no gradient during the warm-up and the
    multi-modal branch none from samples gated to the uni-modal branch.

    Args:
        denoiser: the ``DAMMDenoiser``.
        device: this rank's device.
        find_unused_parameters: see above.

    Returns:
        The DDP wrapper (pass it as the diffusion trainer's ``network``).
    """
    from damm.engines.diffusion_trainer import ForwardAll

    return _ddp(ForwardAll(denoiser), device, find_unused_parameters)

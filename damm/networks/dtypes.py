"""Dtype helper for the fp32 islands of the DAMM networks under mixed precision (see ``transforms.precision``)."""

from __future__ import annotations

import torch

__all__ = ["upcast"]

_HALF = (torch.float16, torch.bfloat16)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """A half-precision (bf16/fp16) tensor as fp32; any other tensor unchanged (no copy, no fp64 downcast).

    Outside autocast the DAMM networks compute in fp32 (or fp64 in numerical checks), where this is the identity,
    so the fp32 islands change nothing there.

    Args:
        x: a tensor.

    Returns:
        ``x.float()`` when ``x`` is bf16 or fp16, else ``x``.
    """
    return x.float() if x.dtype in _HALF else x

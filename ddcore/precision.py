"""Mixed precision for training and inference: one ``precision`` setting, ``torch.autocast`` underneath.

``precision`` is ``"fp32"`` (no autocast), ``"bf16"`` (CPU with AMX/AVX512-BF16, recent GPUs) or ``"fp16"``
(CUDA only, with a gradient scaler in training). Under autocast, convolutions and matrix products run in the low
precision; what must stay in fp32 stays there:

- normalisation layers: :func:`keep_norms_fp32` swaps every ``GroupNorm``/``LayerNorm``/``BatchNorm``/``InstanceNorm``
  of a network
  for a subclass that computes (and returns) fp32 whatever autocast would do (CPU autocast runs GroupNorm and
  softmax in bf16 when their input is bf16). The swap keeps parameter names, so checkpoints are unchanged;
- any other island (attention softmax, the DAMM confidence and gating decision, losses, scheduler arithmetic, DRDM
  field composition and Jacobians) runs inside :func:`fp32` on tensors upcast with ``.float()``.

Parameters and checkpoints stay fp32: autocast casts per op, it never converts weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "FP32BatchNorm1d",
    "FP32BatchNorm2d",
    "FP32BatchNorm3d",
    "FP32GroupNorm",
    "FP32InstanceNorm1d",
    "FP32InstanceNorm2d",
    "FP32InstanceNorm3d",
    "FP32LayerNorm",
    "autocast",
    "autocast_dtype",
    "canonical_precision",
    "check_precision",
    "fp32",
    "keep_norms_fp32",
    "make_grad_scaler",
    "skip_nonfinite_steps",
    "upcast",
]

logger = logging.getLogger(__name__)

#: The accepted ``precision`` settings.
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_HALF = (torch.float16, torch.bfloat16)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """A half-precision (bf16/fp16) tensor as fp32; any other tensor unchanged (no copy, no fp64 downcast).

    Outside autocast the networks compute in fp32 (or fp64 in numerical checks), where this is the identity, so
    the fp32 islands change nothing there.

    Args:
        x: a tensor.

    Returns:
        ``x.float()`` when ``x`` is bf16 or fp16, else ``x``.
    """
    return x.float() if x.dtype in _HALF else x


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def canonical_precision(precision: str, setting: str = "precision") -> str:
    """Validate a precision *name* only (no device check; use :func:`check_precision` once the device is known).

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (or ``"float32"``, ``"bfloat16"``, ``"float16"``).
        setting: the name of the config entry, used in error messages.

    Returns:
        The canonical name.

    Raises:
        ValueError: an unknown name.
    """
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
    name = str(precision).strip().lower()
    name = aliases.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"{setting}={precision!r} is not a precision; expected one of {PRECISIONS}")
    return name


def check_precision(precision: str, device: str | torch.device | None = None, setting: str = "precision") -> str:
    """Validate a ``precision`` setting for a device, before any work starts.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (case-insensitive; ``"float32"``, ``"bfloat16"``,
            ``"float16"`` are accepted too).
        device: the device the work runs on (``None``: CPU).
        setting: the name of the config entry, used in error messages.

    Returns:
        The canonical name (``"fp32"``, ``"bf16"`` or ``"fp16"``).

    Raises:
        ValueError: an unknown name, fp16 on a CPU, or bf16 on a GPU without bf16 support.
    """
    name = canonical_precision(precision, setting)
    kind = _device_type(device)
    if name == "fp16" and kind != "cuda":
        raise ValueError(
            f"{setting}='fp16' needs a CUDA device (fp16 autocast on {kind} is slow and unscaled); use 'bf16' on CPU"
        )
    if name == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{setting}='bf16' but this GPU has no bf16 support; use 'fp16' (or 'fp32')")
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision (``None`` for fp32).

    Args:
        precision: a name accepted by :func:`check_precision`.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or ``None``.
    """
    return _DTYPES[canonical_precision(precision)]


def autocast(precision: str, device: str | torch.device | None = None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32).

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: the device of the work (its type selects the autocast backend).

    Returns:
        A context manager.

    Raises:
        ValueError: see :func:`check_precision`.
    """
    name = check_precision(precision, device)
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=_DTYPES[name])


@contextlib.contextmanager
def fp32(device: str | torch.device | None = None) -> Iterator[None]:
    """An fp32 island: autocast is disabled inside (upcast the inputs with ``.float()`` yourself).

    Args:
        device: the device whose autocast backend to disable (``None``: CPU and, when available, CUDA).

    Yields:
        Nothing.
    """
    kinds = [_device_type(device)] if device is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


class _FP32Norm:
    """Mixin: run the parent normalisation in fp32 with autocast off; the output is fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` in fp32 (autocast off when it is on).

        Args:
            x: input of any float dtype.

        Returns:
            The normalised tensor, fp32.
        """
        if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)  # type: ignore[misc]
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())  # type: ignore[misc]


class FP32GroupNorm(_FP32Norm, nn.GroupNorm):
    """``nn.GroupNorm`` computed in fp32 under autocast (see :func:`keep_norms_fp32`)."""


class FP32LayerNorm(_FP32Norm, nn.LayerNorm):
    """``nn.LayerNorm`` computed in fp32 under autocast."""


class FP32InstanceNorm1d(_FP32Norm, nn.InstanceNorm1d):
    """``nn.InstanceNorm1d`` computed in fp32 under autocast."""


class FP32InstanceNorm2d(_FP32Norm, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` computed in fp32 under autocast."""


class FP32InstanceNorm3d(_FP32Norm, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` computed in fp32 under autocast."""


class FP32BatchNorm1d(_FP32Norm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computed in fp32 under autocast."""


class FP32BatchNorm2d(_FP32Norm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` computed in fp32 under autocast."""


class FP32BatchNorm3d(_FP32Norm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` computed in fp32 under autocast."""


_FP32_NORMS: dict[type, type] = {
    nn.GroupNorm: FP32GroupNorm,
    nn.LayerNorm: FP32LayerNorm,
    nn.BatchNorm1d: FP32BatchNorm1d,
    nn.BatchNorm2d: FP32BatchNorm2d,
    nn.BatchNorm3d: FP32BatchNorm3d,
    nn.InstanceNorm1d: FP32InstanceNorm1d,
    nn.InstanceNorm2d: FP32InstanceNorm2d,
    nn.InstanceNorm3d: FP32InstanceNorm3d,
}


def keep_norms_fp32(module: nn.Module) -> nn.Module:
    """Make every normalisation layer of ``module`` compute in fp32 under autocast (in place).

    Exact instances of ``GroupNorm``, ``LayerNorm``, ``BatchNorm{1,2,3}d`` and ``InstanceNorm{1,2,3}d`` get their
    fp32 subclass; parameters, buffers and state-dict keys are untouched, and outside autocast (fp32 inputs)
    nothing changes.

    Args:
        module: a network.

    Returns:
        The same ``module``.
    """
    for sub in module.modules():
        replacement = _FP32_NORMS.get(type(sub))
        if replacement is not None:
            sub.__class__ = replacement
    return module


def make_grad_scaler(precision: str, device: str | torch.device | None = None) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training (``None`` for fp32 and bf16, which need none).

    Args:
        precision: the training precision.
        device: the training device.

    Returns:
        ``torch.amp.GradScaler`` or ``None``.
    """
    if check_precision(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler(_device_type(device))


def skip_nonfinite_steps(optimizer: torch.optim.Optimizer, name: str = "optimizer") -> Any:
    """Make ``optimizer.step()`` a no-op (with a warning) when any gradient is NaN/Inf.

    A gradient scaler does this for fp16; bf16 has no scaler, and one non-finite gradient would otherwise write NaN
    into the weights and, through every later checkpoint, lose the run. The hook drops all gradients of that step
    (parameters whose ``grad`` is ``None`` are not updated) and counts the skipped steps in
    ``optimizer.skipped_nonfinite_steps``.

    Args:
        optimizer: any ``torch.optim`` optimiser.
        name: name used in the warning.

    Returns:
        The hook handle (``.remove()`` undoes it).
    """
    optimizer.skipped_nonfinite_steps = 0  # type: ignore[attr-defined]

    def _pre_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):  # one fused pass, one sync
            return
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None
        opt.skipped_nonfinite_steps += 1  # type: ignore[attr-defined]
        logger.warning(
            "%s: non-finite gradient, step skipped (%d so far); frequent skips mean the precision or the learning "
            "rate is unsuitable",
            name,
            opt.skipped_nonfinite_steps,  # type: ignore[attr-defined]
        )

    return optimizer.register_step_pre_hook(_pre_step)

"""DRDM training on MONAI/ignite engines (spec drdm.md Algorithm 1 and §2.4).

Each iteration draws ``t ~ U{0..T-1}``, deforms the batch with the forward process (``I_t``, target ``ψ_t``),
predicts ``û = D_θ(I_t, t)`` and minimises :class:`drdm.losses.DRDMLoss`. The diffusion happens in
:class:`DRDMPrepareBatch`, so the standard :class:`monai.engines.SupervisedTrainer` iteration is reused
unchanged; :class:`DRDMTrainer` only wires it up and exposes the loss terms for logging. Checkpoints come from the
project's one checkpoint stack, :mod:`ddcore.checkpoints` (``AtomicCheckpointSaver``: atomic, ignite-named
``checkpoint_epoch=N.pt`` files of plain tensor dicts that ``torch.load(..., weights_only=True)`` and MONAI's
``CheckpointLoader`` read back for resuming, and the network's weights exported as ``model.pt`` at the end).

Precision: ``SupervisedTrainer``'s ``amp`` autocasts CUDA only, so the network forward runs under
:func:`ddcore.precision.autocast` inside :class:`PrecisionInferer` (any device) and its output is upcast to fp32;
the forward diffusion (``prepare_batch``) and :class:`~drdm.losses.DRDMLoss` run outside autocast / in an fp32
island. fp16 (CUDA only) also enables MONAI's ``amp`` path for its gradient scaler. Parameters, optimiser state and
checkpoints stay fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines import PrepareBatch, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import SimpleInferer
from monai.transforms import (
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
)
from torch import nn

from ddcore.precision import autocast, autocast_dtype, check_precision, make_grad_scaler, skip_nonfinite_steps
from drdm.diffusion import DeformationDiffusion
from drdm.losses import DRDMLoss

__all__ = [
    "LOSS_KEYS",
    "DRDMPrepareBatch",
    "DRDMTrainer",
    "PrecisionInferer",
    "augmentation_transforms",
    "loss_terms",
]

LOSS_KEYS = ("loss", "loss_dist", "loss_ang", "loss_reg", "loss_negjac")


class DRDMPrepareBatch(PrepareBatch):
    """Turn a batch of clean images into ``(I_t, ψ_t, (t,), {})`` with the forward process.

    Args:
        diffusion: the forward process.
        image_key: key of the image in the batch dict.
    """

    def __init__(self, diffusion: DeformationDiffusion, image_key: str = "image") -> None:
        self.diffusion = diffusion
        self.image_key = image_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        """Deform the batch; returns network input, target, extra args ``(t,)`` and kwargs."""
        if self.image_key not in batchdata:
            raise KeyError(f"DRDM training batch has no {self.image_key!r} key (keys: {list(batchdata)}).")
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        image = image.float()
        t = self.diffusion.sample_timesteps(image.shape[0], device=image.device)
        sample = self.diffusion.q_sample(image, t)
        return sample.image, sample.step_field, (sample.t,), {}


class PrecisionInferer(SimpleInferer):
    """:class:`monai.inferers.SimpleInferer` that runs the network under autocast and returns fp32.

    Args:
        precision: ``"fp32"`` (plain forward), ``"bf16"`` or ``"fp16"`` (CUDA only).
        device: device used to validate ``precision`` (the autocast backend follows the inputs' device).

    Raises:
        ValueError: a precision the device cannot run (see :func:`ddcore.precision.check_precision`).
    """

    def __init__(self, precision: str = "fp32", device: str | torch.device | None = None) -> None:
        super().__init__()
        self.precision = check_precision(precision, device)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """``network(inputs, *args, **kwargs)`` under autocast, upcast to float32."""
        with autocast(self.precision, inputs.device):
            out = network(inputs, *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def loss_terms(output: Any) -> dict[str, float]:
    """``output_transform`` for Stats/TensorBoard handlers: the loss terms of the last iteration as floats."""
    out = output[0] if isinstance(output, (list, tuple)) else output
    return {k: float(out[k].detach() if isinstance(out[k], torch.Tensor) else out[k]) for k in LOSS_KEYS if k in out}


class DRDMTrainer(SupervisedTrainer):
    """:class:`monai.engines.SupervisedTrainer` for DRDM (the forward diffusion runs in ``prepare_batch``).

    Args:
        device: torch device.
        max_epochs: epochs to run.
        train_data_loader: loader of dicts with ``image_key`` (``[B, C, *S]`` in [0, 1]).
        network: recovery network ``D_θ(x, t)``.
        optimizer: optimiser of the network.
        diffusion: the forward process.
        loss_function: default :class:`drdm.losses.DRDMLoss`.
        image_key: image key in the batch.
        epoch_length: iterations per epoch (default: loader length).
        train_handlers: ignite/MONAI handlers.
        precision: ``"fp32"`` (default), ``"bf16"`` (CPU or GPU autocast) or ``"fp16"`` (CUDA only, with a
            gradient scaler); validated before any work. Only the network forward is autocast.
        amp: legacy switch, same as ``precision="fp16"``.
        **kwargs: other :class:`SupervisedTrainer` arguments (not ``inferer``, ``amp_kwargs``).

    Raises:
        ValueError: a precision the device cannot run, or ``amp=True`` with another precision than fp16/fp32.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        diffusion: DeformationDiffusion,
        loss_function: Callable | None = None,
        image_key: str = "image",
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        precision: str = "fp32",
        amp: bool = False,
        **kwargs: Any,
    ) -> None:
        name = check_precision(precision, device)
        if amp:
            if name not in ("fp32", "fp16"):
                raise ValueError(f"amp=True means precision='fp16'; got precision={precision!r} as well.")
            name = check_precision("fp16", device)
        self.precision = name
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function if loss_function is not None else DRDMLoss(),
            epoch_length=epoch_length,
            prepare_batch=DRDMPrepareBatch(diffusion, image_key),
            inferer=PrecisionInferer(name, device),
            train_handlers=train_handlers,
            amp=name == "fp16",
            amp_kwargs={"dtype": autocast_dtype(name)} if name == "fp16" else None,
            decollate=False,
            **kwargs,
        )
        if name == "fp16":  # MONAI builds torch.cuda.amp.GradScaler (deprecated); same object, current API
            self.scaler = make_grad_scaler(name, device)
        else:  # bf16/fp32 have no scaler to skip a step with NaN/Inf gradients: never write NaN into the weights
            skip_nonfinite_steps(optimizer, "DRDMTrainer")
        self.diffusion = diffusion
        self.add_event_handler(IterationEvents.LOSS_COMPLETED, self._record_terms)

    @staticmethod
    def _record_terms(engine: Engine) -> None:
        terms = getattr(engine.loss_function, "last_terms", None) or {}
        for key, value in terms.items():
            if key != "loss":
                engine.state.output[key] = value


def augmentation_transforms(
    spatial_dims: int,
    keys: str | Sequence[str] = "image",
    prob_affine: float | None = None,
    rotate_range: float = math.pi,
    translate_fraction: float = 0.125,
    roi_size: Sequence[int] | None = None,
    prob_flip: float = 0.5,
    prob_zoom: float = 0.8,
    max_zoom: float = 1.0 / 0.6,
    prob_contrast: float = 0.5,
    gain_std: float = 0.1,
    offset_std: float = 0.1,
) -> list:
    """Spatial and intensity augmentation applied before the diffusion (spec §2.4), from MONAI transforms.

    2D: random affine (rotation ``±rotate_range``, translation ``±translate_fraction`` of ``roi_size``, prob 0.8),
    flip along axis 0 (prob 0.5), random gamma contrast (prob 0.5). 3D: random rotation about all axes (prob 0.6),
    random zoom-in of up to ``max_zoom`` (a 60-100 % sub-crop resized back, prob 0.8). Both: a random global gain
    and offset (uniform ``±gain_std`` / ``±offset_std``; the official code draws them from a normal law).

    Args:
        spatial_dims: 2 or 3.
        keys: image keys.
        prob_affine: probability of the affine / rotation (default 0.8 in 2D, 0.6 in 3D).
        rotate_range: maximum rotation (radians).
        translate_fraction: 2D translation range as a fraction of ``roi_size``.
        roi_size: patch size (needed for the 2D translation; omitted: no translation).
        prob_flip: 2D flip probability.
        prob_zoom: 3D zoom probability.
        max_zoom: 3D maximum zoom factor.
        prob_contrast: 2D gamma-contrast probability.
        gain_std: intensity gain range.
        offset_std: intensity offset range.

    Returns:
        List of MONAI dictionary transforms.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    out: list = []
    if spatial_dims == 2:
        translate = [translate_fraction * s for s in roi_size] if roi_size else None
        out.append(
            RandAffined(
                keys,
                prob=0.8 if prob_affine is None else prob_affine,
                rotate_range=rotate_range,
                translate_range=translate,
                padding_mode="zeros",
            )
        )
        out.append(RandFlipd(keys, prob=prob_flip, spatial_axis=0))
        out.append(RandAdjustContrastd(keys, prob=prob_contrast, gamma=(0.7, 1.5)))
    else:
        out.append(
            RandRotated(
                keys,
                range_x=rotate_range,
                range_y=rotate_range,
                range_z=rotate_range,
                prob=0.6 if prob_affine is None else prob_affine,
                padding_mode="zeros",
            )
        )
        out.append(RandZoomd(keys, prob=prob_zoom, min_zoom=1.0, max_zoom=max_zoom, keep_size=True))
    if gain_std > 0:
        out.append(RandScaleIntensityd(keys, factors=gain_std, prob=1.0))
    if offset_std > 0:
        out.append(RandShiftIntensityd(keys, offsets=offset_std, prob=1.0))
    return out

"""Stage 1: one latent autoencoder per modality, trained together by one ignite engine.

Each modality (the target and every condition) has its own autoencoder and, optionally, its own patch
discriminator. The networks are independent: the engine sums their losses and steps one Adam over all
autoencoders (element-wise optimisers such as Adam make this identical to one optimiser per network).

Generator loss per modality: ``l1_weight * L1 + regularisation_weight * (KL or VQ term)
+ perceptual_weight * perceptual + adversarial_weight * adversarial`` (the adversarial term from
``adversarial_start_iteration`` on). Discriminator loss: the MONAI ``PatchAdversarialLoss`` on real and
reconstructed images. :class:`AutoencoderEvaluator` reports reconstruction PSNR and SSIM per modality: the
ceiling the diffusion result can never beat.

Mixed precision (``precision``: ``"fp32"``, ``"bf16"``, ``"fp16"`` CUDA only; see ``ddcore.precision``): the
network forward passes run under ``torch.autocast``, the losses in fp32 on upcast outputs, fp16 training uses a
``GradScaler``. Weights and checkpoints stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.engines import Evaluator, Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.handlers import IgniteMetricHandler, from_engine
from monai.losses import PatchAdversarialLoss
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.utils import eval_mode
from torch import nn

from ddcore.precision import autocast, check_precision, make_grad_scaler, skip_nonfinite_steps

__all__ = [
    "AutoencoderEvaluator",
    "AutoencoderTrainer",
    "build_perceptual_loss",
    "reconstruction_metrics",
    "to_unit_range",
]


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map a ``[-1, 1]`` image to ``[0, 1]`` (clamped), the space every metric of the project uses.

    Args:
        x: image tensor.

    Returns:
        ``clamp((x + 1) / 2, 0, 1)``.
    """
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def build_perceptual_loss(
    spatial_dims: int = 2,
    weight: float = 0.0,
    network_type: str = "resnet50",
    pretrained_path: str | None = None,
    is_fake_3d: bool = True,
    fake_3d_ratio: float = 0.2,
) -> nn.Module | None:
    """MONAI ``PerceptualLoss`` when ``weight > 0``, else ``None`` (never downloads weights).

    Args:
        spatial_dims: 2 or 3.
        weight: the perceptual weight of the generator loss; 0 disables the loss (the default: torchvision is
            optional and pretrained weights must be supplied locally).
        network_type: MONAI network type; ``resnet50`` is the only one that runs offline.
        pretrained_path: local weights file (``None``: random weights, meaningful only for smoke tests).
        is_fake_3d: 3D via 2.5D slices.
        fake_3d_ratio: fraction of slices for fake 3D.

    Returns:
        The loss module or ``None``.

    Raises:
        ImportError: ``weight > 0`` but torchvision (needed by the resnet50 perceptual network) is not installed.
        ValueError: a network type that would download weights.
    """
    if float(weight) <= 0.0:
        return None
    if network_type != "resnet50":
        raise ValueError(
            f"perceptual network_type={network_type!r} downloads weights at construction; use 'resnet50' with a "
            "local pretrained_path (or set the perceptual weight to 0)"
        )
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # torchvision missing or not importable against this torch build
        raise ImportError(
            f"perceptual loss weight is {weight} but torchvision cannot be imported ({err}); MONAI's PerceptualLoss "
            "(resnet50) needs it. Install a torchvision matching your torch, or set the perceptual weight to 0 "
            "(bundle config: ae_perceptual_weight)."
        ) from err
    from monai.losses import PerceptualLoss

    return PerceptualLoss(
        spatial_dims=spatial_dims,
        network_type="resnet50",
        is_fake_3d=is_fake_3d,
        fake_3d_ratio=fake_3d_ratio,
        pretrained=pretrained_path is not None,
        pretrained_path=pretrained_path,
    )


class AutoencoderTrainer(Trainer):
    """Ignite trainer for the per-modality autoencoders (VAE/VQ-GAN style).

    Args:
        device: training device.
        max_epochs: epochs to train.
        train_data_loader: yields dicts holding a ``[B, C, *spatial]`` image per key of ``keys``.
        autoencoders: ``{modality: LatentAutoencoder}`` (a ``ModuleDict``; entries may be DDP-wrapped).
        g_optimizer: optimiser over all autoencoder parameters.
        keys: modalities to train (default: all of ``autoencoders``).
        discriminators: ``{modality: PatchDiscriminator}`` or ``None`` (no adversarial term).
        d_optimizer: optimiser over all discriminator parameters (required with ``discriminators``).
        l1_weight: weight of the L1 reconstruction term.
        regularisation_weight: weight of the KL (or VQ) term returned by the autoencoder.
        perceptual_loss: optional perceptual loss module (see :func:`build_perceptual_loss`).
        perceptual_weight: its weight.
        adversarial_loss: ``PatchAdversarialLoss`` (default: least squares).
        adversarial_weight: weight of the generator's adversarial term.
        adversarial_start_iteration: the adversarial terms (G and D) start after this many iterations.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only, with a gradient scaler): autocast
            dtype of the forward passes; losses stay fp32.
        epoch_length, non_blocking, iteration_update, postprocessing, key_train_metric, additional_metrics,
        metric_cmp_fn, train_handlers, event_names, event_to_attr, decollate: as for MONAI's trainers.

    Raises:
        ValueError: unknown keys, a discriminator without optimiser, a perceptual weight without a loss, an unknown
            ``precision`` or one the device cannot run (checked before anything else).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        autoencoders: Mapping[str, nn.Module],
        g_optimizer: torch.optim.Optimizer,
        keys: Sequence[str] | None = None,
        discriminators: Mapping[str, nn.Module] | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        l1_weight: float = 1.0,
        regularisation_weight: float = 1e-6,
        perceptual_loss: nn.Module | None = None,
        perceptual_weight: float = 0.0,
        adversarial_loss: Callable | None = None,
        adversarial_weight: float = 0.01,
        adversarial_start_iteration: int = 100,
        precision: str = "fp32",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
    ) -> None:
        precision = check_precision(precision, device, setting="precision")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
        )
        self.autoencoders = autoencoders
        self.keys = list(autoencoders.keys()) if keys is None else list(keys)
        unknown = [k for k in self.keys if k not in autoencoders]
        if unknown:
            raise ValueError(f"AutoencoderTrainer: no autoencoder for {unknown}; configured: {list(autoencoders)}")
        if discriminators is not None:
            if d_optimizer is None:
                raise ValueError("AutoencoderTrainer: discriminators need a d_optimizer")
            missing = [k for k in self.keys if k not in discriminators]
            if missing:
                raise ValueError(f"AutoencoderTrainer: no discriminator for {missing}")
        if perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError(
                "AutoencoderTrainer: perceptual_weight > 0 but no perceptual_loss (see build_perceptual_loss)"
            )
        self.g_optimizer = g_optimizer
        self.discriminators = discriminators
        self.d_optimizer = d_optimizer
        self.l1_weight = float(l1_weight)
        self.regularisation_weight = float(regularisation_weight)
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = float(perceptual_weight)
        self.adversarial_loss = adversarial_loss or PatchAdversarialLoss(criterion="least_squares")
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_start_iteration = int(adversarial_start_iteration)
        self.precision = precision
        # not `self.scaler`: MONAI's Trainer.run() overwrites that attribute from its own `amp` flag
        self.grad_scaler = make_grad_scaler(precision, device)
        if self.grad_scaler is None:  # fp32/bf16: a NaN/Inf gradient skips the step instead of poisoning the weights
            for opt, label in ((g_optimizer, "autoencoder optimiser"), (d_optimizer, "discriminator optimiser")):
                if opt is not None:
                    skip_nonfinite_steps(opt, label)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.grad_scaler is None:
            loss.backward()
        else:
            self.grad_scaler.scale(loss).backward()

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_scaler is None:
            optimizer.step()
        else:
            self.grad_scaler.step(optimizer)

    def adversarial_active(self, iteration: int) -> bool:
        """Whether the adversarial terms are on at a (1-based) iteration.

        Args:
            iteration: the engine's iteration counter during the step.

        Returns:
            ``True`` when discriminators exist, the weight is positive and ``iteration`` is past the start.
        """
        return (
            self.discriminators is not None
            and self.adversarial_weight > 0
            and iteration > self.adversarial_start_iteration
        )

    def _iteration(self, engine: Engine, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        device = engine.state.device
        images = {}
        for k in self.keys:
            if k not in batchdata:
                raise KeyError(f"AutoencoderTrainer: batch has no {k!r} image; keys: {sorted(batchdata)}")
            images[k] = torch.as_tensor(batchdata[k]).to(device, non_blocking=self.non_blocking).float()
        adversarial = self.adversarial_active(engine.state.iteration)
        for ae in self.autoencoders.values():
            ae.train()
        out: dict[str, Any] = {}
        recons: dict[str, torch.Tensor] = {}
        self.g_optimizer.zero_grad(set_to_none=True)
        g_total = torch.zeros((), device=device)
        for k in self.keys:
            with autocast(self.precision, device):
                res = self.autoencoders[k](images[k])
            recon = res.reconstruction.float()  # losses in fp32
            l1 = F.l1_loss(recon, images[k])
            loss = self.l1_weight * l1 + self.regularisation_weight * res.regularisation_loss.float()
            if self.perceptual_loss is not None and self.perceptual_weight > 0:
                with autocast(self.precision, device):
                    perceptual = self.perceptual_loss(recon, images[k])
                loss = loss + self.perceptual_weight * perceptual.float()
            if adversarial:
                with autocast(self.precision, device):
                    logits = self.discriminators[k](recon)[-1]  # type: ignore[index]
                g_adv = self.adversarial_loss(logits.float(), target_is_real=True, for_discriminator=False)
                loss = loss + self.adversarial_weight * g_adv
                out[f"g_adv_{k}"] = float(g_adv.detach())
            g_total = g_total + loss
            recons[k] = recon
            out[f"l1_{k}"] = float(l1.detach())
            out[f"reg_{k}"] = float(res.regularisation_loss.detach())
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        self._backward(g_total)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self._step(self.g_optimizer)
        out["g_loss"] = float(g_total.detach())
        if adversarial:
            self.d_optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            d_total = torch.zeros((), device=device)
            for k in self.keys:
                n = images[k].shape[0]
                # one forward over real and fake (DDP allows one forward per backward)
                with autocast(self.precision, device):
                    logits = self.discriminators[k](torch.cat([recons[k].detach(), images[k]]))[-1]  # type: ignore[index]
                logits = logits.float()
                d_fake = self.adversarial_loss(logits[:n], target_is_real=False, for_discriminator=True)
                d_real = self.adversarial_loss(logits[n:], target_is_real=True, for_discriminator=True)
                d_loss = 0.5 * (d_fake + d_real)
                d_total = d_total + d_loss
                out[f"d_loss_{k}"] = float(d_loss.detach())
            self._backward(d_total)
            self._step(self.d_optimizer)  # type: ignore[arg-type]
            out["d_loss"] = float(d_total.detach())
        if self.grad_scaler is not None:
            self.grad_scaler.update()  # once per iteration, after every optimiser stepped
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out


def reconstruction_metrics(
    keys: Sequence[str], spatial_dims: int = 2, ssim_win_size: int = 11, prefix: str = ""
) -> dict[str, Metric]:
    """PSNR and SSIM metric handlers per modality on ``[0, 1]`` images (``data_range`` 1).

    They read ``output[k + "_recon"]`` and ``output[k]`` of :class:`AutoencoderEvaluator` (decollated).

    Args:
        keys: modalities.
        spatial_dims: 2 or 3.
        ssim_win_size: Gaussian SSIM window (must not exceed the image size).
        prefix: prepended to every metric name.

    Returns:
        ``{f"{prefix}psnr_{k}": ..., f"{prefix}ssim_{k}": ...}``, PSNR of ``keys[0]`` first.
    """
    metrics: dict[str, Metric] = {}
    for k in keys:
        ot = from_engine([f"{k}_recon", k])
        metrics[f"{prefix}psnr_{k}"] = IgniteMetricHandler(metric_fn=PSNRMetric(max_val=1.0), output_transform=ot)
    for k in keys:
        ot = from_engine([f"{k}_recon", k])
        metrics[f"{prefix}ssim_{k}"] = IgniteMetricHandler(
            metric_fn=SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, win_size=ssim_win_size),
            output_transform=ot,
        )
    return metrics


class AutoencoderEvaluator(Evaluator):
    """Reconstruction check of the per-modality autoencoders (the synthesis ceiling).

    Each iteration encodes every modality deterministically (``encode``, as the diffusion stage does) and decodes
    it; the output holds ``k`` and ``k + "_recon"`` in ``[0, 1]`` for the metric handlers of
    :func:`reconstruction_metrics` (built automatically when no metric is given: PSNR and SSIM per modality).

    Args:
        device: device.
        val_data_loader: yields dicts with one image per key.
        autoencoders: ``{modality: LatentAutoencoder}``.
        keys: modalities to check (default: all).
        spatial_dims: for the default SSIM metric.
        ssim_win_size: SSIM window of the default metrics.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only): autocast dtype of encode/decode
            (the reconstruction is returned in fp32).
        epoch_length, non_blocking, iteration_update, postprocessing, key_val_metric, additional_metrics,
        metric_cmp_fn, val_handlers, decollate: as for MONAI's evaluators.

    Raises:
        ValueError: an unknown ``precision`` or one the device cannot run.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        autoencoders: Mapping[str, nn.Module],
        keys: Sequence[str] | None = None,
        spatial_dims: int = 2,
        ssim_win_size: int = 11,
        precision: str = "fp32",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Callable | None = None,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        val_handlers: Sequence | None = None,
        decollate: bool = True,
    ) -> None:
        precision = check_precision(precision, device, setting="precision")
        keys = list(autoencoders.keys()) if keys is None else list(keys)
        if key_val_metric is None:
            metrics = reconstruction_metrics(keys, spatial_dims, ssim_win_size)
            first = next(iter(metrics))
            key_val_metric = {first: metrics.pop(first)}
            additional_metrics = {**metrics, **(additional_metrics or {})}
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=val_handlers,
            decollate=decollate,
        )
        self.autoencoders = autoencoders
        self.keys = keys
        self.precision = precision

    def _iteration(self, engine: Engine, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        device = engine.state.device
        out: dict[str, Any] = {}
        with eval_mode(*self.autoencoders.values()), torch.no_grad():
            for k in self.keys:
                x = torch.as_tensor(batchdata[k]).to(device).float()
                ae = self.autoencoders[k]
                ae = getattr(ae, "module", ae)  # DDP
                with autocast(self.precision, device):
                    recon = ae.decode(ae.encode(x))
                out[k] = to_unit_range(x)
                out[f"{k}_recon"] = to_unit_range(recon.float())
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out

"""Stage 2: the latent DAMM diffusion trainer (ignite/MONAI).

Each iteration draws ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, noises the cached target latent with the training
``DDPMScheduler`` (through the inferer), runs both branches of the denoiser on ``[x_t, z_anchor, z_aux...]`` and
applies :class:`damm.losses.DAMMLoss`: the joint warm-up for the first ``divergence_aware_start_iteration``
iterations, then the divergence-aware phase (spec ``damm.md`` §3.2, switched by iteration rather than epoch).
The output holds the total loss and both branch losses, the mean confidence, the label rate and the fraction of
samples gated to the multi-modal branch, for ``StatsHandler``/``TensorBoardStatsHandler``; their epoch means are
attached as ignite metrics (``epoch_<name>``).

Gate diagnosis and training (issue 14): the output also holds the label rate per timestep quarter
(``label_rate_t0_250`` ... ``label_rate_t750_1000`` for T = 1000; epoch to date, NaN while a quarter has had no
labelled sample) and, when the batch carries a ``divergent`` flag, ``label_divergence_agreement`` (share of labels
``y = not divergent``) and the batch's mean confidence on its consistent and divergent samples
(``confidence_mean_consistent``, ``confidence_mean_divergent``; their epoch means show how the gate's separation
develops over training). With ``gate_training="averaged"`` the trainer draws ``gate_label_timesteps`` further
timesteps per sample (no gradient) whose branch errors average into the label. The last
``gate_calibration_iterations`` iterations are a calibration phase: the network runs in eval mode, the loss is the
confidence term alone and only the confidence path (``uafm.confidence_head``) is updated, the denoiser frozen.
With ``gate_training="correspondence"`` the divergence-aware (and calibration) iterations mismatch the auxiliary
latents of a ``gate_mismatch_fraction`` share of the batch (:func:`damm.losses.mismatch_auxiliary`) before the
forward pass; the loss labels those samples 0 and the genuine ones 1.

Mixed precision (``precision``; see ``ddcore.precision``): the noising and the denoiser forward run under
``torch.autocast``; the denoiser returns fp32 predictions and confidence (its fp32 islands), the loss is computed in
fp32 outside autocast, and fp16 (CUDA) scales the loss with a ``GradScaler``. Weights stay fp32.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Average, Metric
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from torch import nn

from damm.losses import branch_errors, diffusion_target, min_snr_weights, mismatch_auxiliary
from ddcore.precision import autocast, check_precision, make_grad_scaler, skip_nonfinite_steps

__all__ = ["LOGGED_KEYS", "DAMMDiffusionTrainer", "ForwardAll", "confidence_parameters", "label_rate_buckets"]

#: Keys of the trainer output that are also averaged per epoch.
LOGGED_KEYS = (
    "loss",
    "loss_uni",
    "loss_multi",
    "confidence_mean",
    "label_rate",
    "gated_multi_fraction",
    "loss_confidence",
    "label_given_fraction",
)

#: Name fragment of the confidence path's parameters (the only ones the calibration phase updates).
CONFIDENCE_PATH = "uafm.confidence_head."


def confidence_parameters(network: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters of the denoiser's confidence path (also inside ``DDP(ForwardAll(denoiser))``).

    Args:
        network: the denoiser or its wrapper.

    Returns:
        ``(name, parameter)`` pairs whose name contains ``uafm.confidence_head.``.
    """
    return [(n, p) for n, p in network.named_parameters() if CONFIDENCE_PATH in f".{n}"]


def _confidence_by_subset(confidence: torch.Tensor | None, divergent: Any) -> dict[str, float]:
    """Mean confidence ``c`` of this batch's consistent and divergent samples (NaN for an absent subset)."""
    if confidence is None or divergent is None:
        return {}
    c = confidence.detach().float().cpu().reshape(-1)
    flag = torch.as_tensor(divergent).reshape(-1).bool().cpu()
    if flag.numel() != c.numel():
        return {}
    return {
        f"confidence_mean_{name}": float(c[mask].mean()) if mask.any() else float("nan")
        for name, mask in (("consistent", ~flag), ("divergent", flag))
    }


def label_rate_buckets(num_train_timesteps: int, buckets: int = 4) -> list[tuple[int, int, str]]:
    """Timestep buckets of the label-rate diagnosis: ``(low, high, key)`` with ``low <= t < high``.

    Args:
        num_train_timesteps: T.
        buckets: how many equal buckets.

    Returns:
        E.g. ``(0, 250, "label_rate_t0_250")`` ... ``(750, 1000, "label_rate_t750_1000")`` for T = 1000.
    """
    edges = [round(i * num_train_timesteps / buckets) for i in range(buckets + 1)]
    return [(lo, hi, f"label_rate_t{lo}_{hi}") for lo, hi in itertools.pairwise(edges)]


class ForwardAll(nn.Module):
    """Adapter whose ``forward`` is the denoiser's ``forward_all`` (so ``DistributedDataParallel`` can wrap it).

    Args:
        denoiser: a ``DAMMDenoiser``.
    """

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, use_uncertainty: bool = True) -> Any:
        """``denoiser.forward_all(x, timesteps, use_uncertainty)``.

        Args:
            x: ``cat([x_t, z_anchor, z_aux...], dim=1)``.
            timesteps: ``[B]``.
            use_uncertainty: UAFM uses ``u``.

        Returns:
            The ``DAMMOutput``.
        """
        return self.denoiser.forward_all(x, timesteps, use_uncertainty=use_uncertainty)


class DAMMDiffusionTrainer(Trainer):
    """Trainer of the DAMM denoiser on cached, scaled latents.

    Args:
        device: training device.
        max_epochs: epochs to train.
        train_data_loader: yields dicts of scaled latents, one per modality (see ``LatentCacheDataset``).
        network: the ``DAMMDenoiser`` (or ``DistributedDataParallel(ForwardAll(denoiser))`` under DDP).
        optimizer: optimiser of the denoiser (AdamW in the paper).
        loss_function: :class:`damm.losses.DAMMLoss`.
        inferer: :class:`damm.inferers.DAMMInferer` (owns the training ``DDPMScheduler``).
        target_key: the target modality (no default: the data keys come from the config, ``target``).
        condition_keys: the condition modalities, anchor first (the config's ``conditions``).
        divergence_aware_start_iteration: warm-up length in iterations; afterwards the divergence-aware phase.
        min_snr_gamma: ``> 0``: weight each sample's loss by min-SNR-gamma (:func:`damm.losses.min_snr_weights`);
            ``0`` (default, the paper): unweighted. The regression target follows the scheduler's
            ``prediction_type`` (:func:`damm.losses.diffusion_target`: ``epsilon`` or ``v_prediction``).
        gate_label_timesteps: extra timesteps per sample whose branch errors average into the label when the loss
            has ``gate_training="averaged"`` (``>= 1`` then; unused by ``"paper"``).
        gate_calibration_iterations: the last this-many iterations train only the confidence path (0: none, the
            paper).
        gate_mismatch_fraction: share of each batch whose auxiliary latents are mismatched when the loss has
            ``gate_training="correspondence"`` (in ``(0, 1)`` then; unused otherwise).
        total_iterations: the run's length, where the calibration phase ends (``None``: ``max_epochs`` times the
            epoch length; set it when an iteration budget ends the run earlier).
        grad_clip_norm: optional gradient-norm clipping (the paper has none).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only, with a gradient scaler): autocast
            dtype of the denoiser forward; the loss stays fp32.
        epoch_length, non_blocking, iteration_update, postprocessing, key_train_metric, additional_metrics,
        metric_cmp_fn, train_handlers, event_names, event_to_attr, decollate: as for MONAI's trainers.

    Raises:
        ValueError: for an empty ``condition_keys``, a negative start iteration or gate setting, an averaged label
            without extra timesteps, a calibration phase on a network without confidence path, an unknown
            ``precision`` or one the device cannot run (checked before anything else).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        inferer: Any,
        target_key: str,
        condition_keys: Sequence[str],
        divergence_aware_start_iteration: int = 400,
        min_snr_gamma: float = 0.0,
        gate_label_timesteps: int = 4,
        gate_calibration_iterations: int = 0,
        gate_mismatch_fraction: float = 0.25,
        total_iterations: int | None = None,
        grad_clip_norm: float | None = None,
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
        if not condition_keys:
            raise ValueError("DAMMDiffusionTrainer: condition_keys must name at least the anchor modality")
        if int(divergence_aware_start_iteration) < 0:
            raise ValueError(
                f"DAMMDiffusionTrainer: divergence_aware_start_iteration must be >= 0, got "
                f"{divergence_aware_start_iteration}"
            )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.inferer = inferer
        self.target_key = target_key
        self.condition_keys = list(condition_keys)
        self.divergence_aware_start_iteration = int(divergence_aware_start_iteration)
        self.grad_clip_norm = grad_clip_norm
        if float(min_snr_gamma) < 0:
            raise ValueError(f"DAMMDiffusionTrainer: min_snr_gamma must be >= 0 (0: off), got {min_snr_gamma}")
        self.min_snr_gamma = float(min_snr_gamma)
        self.precision = precision
        # not `self.scaler`: MONAI's Trainer.run() overwrites that attribute from its own `amp` flag
        self.grad_scaler = make_grad_scaler(precision, device)
        if self.grad_scaler is None:  # fp32/bf16: a NaN/Inf gradient skips the step instead of poisoning the weights
            skip_nonfinite_steps(optimizer, "DAMMDiffusionTrainer")
        for name, value in (
            ("gate_label_timesteps", gate_label_timesteps),
            ("gate_calibration_iterations", gate_calibration_iterations),
        ):
            if int(value) < 0:
                raise ValueError(f"DAMMDiffusionTrainer: {name} must be >= 0, got {value}")
        self.gate_label_timesteps = int(gate_label_timesteps)
        self.gate_calibration_iterations = int(gate_calibration_iterations)
        self.total_iterations = None if total_iterations is None else int(total_iterations)
        self.gate_mismatch_fraction = float(gate_mismatch_fraction)
        if self.correspondence_label and not 0.0 < self.gate_mismatch_fraction < 1.0:
            raise ValueError(
                "DAMMDiffusionTrainer: gate_training 'correspondence' needs gate_mismatch_fraction in (0, 1), got "
                f"{gate_mismatch_fraction}"
            )
        if self.correspondence_label and len(self.condition_keys) < 2:
            raise ValueError("DAMMDiffusionTrainer: gate_training 'correspondence' needs an auxiliary condition")
        if self.averaged_label and self.gate_label_timesteps < 1:
            raise ValueError("DAMMDiffusionTrainer: gate_training 'averaged' needs gate_label_timesteps >= 1")
        if self.gate_calibration_iterations and not confidence_parameters(network):
            raise ValueError(
                "DAMMDiffusionTrainer: gate_calibration_iterations > 0 needs a network with a confidence path "
                f"({CONFIDENCE_PATH!r} parameters)"
            )
        self.buckets = label_rate_buckets(int(inferer.scheduler.num_train_timesteps))
        self._label_counts = torch.zeros(len(self.buckets) + 1, 2, dtype=torch.float64)
        self.add_event_handler(Events.EPOCH_STARTED, lambda _: self._label_counts.zero_())
        for key in LOGGED_KEYS:
            Average(output_transform=lambda out, key=key: out[key]).attach(self, f"epoch_{key}")

    @property
    def averaged_label(self) -> bool:
        """Whether the loss takes its label from several timesteps (``gate_training="averaged"``)."""
        return getattr(self.loss_function, "gate_training", "paper") == "averaged"

    @property
    def correspondence_label(self) -> bool:
        """Whether the loss labels genuine against mismatched pairs (``gate_training="correspondence"``)."""
        return getattr(self.loss_function, "gate_training", "paper") == "correspondence"

    def calibrating(self, iteration: int) -> bool:
        """Whether a (1-based) iteration is in the calibration phase (the last ``gate_calibration_iterations``).

        Args:
            iteration: the engine's iteration counter during the step.

        Returns:
            ``iteration > total - gate_calibration_iterations``.
        """
        if not self.gate_calibration_iterations:
            return False
        total = self.total_iterations
        if total is None:
            total = int(self.state.max_epochs or 0) * int(self.state.epoch_length or 0)
        return iteration > total - self.gate_calibration_iterations

    def divergence_aware(self, iteration: int) -> bool:
        """Whether a (1-based) iteration is in the divergence-aware phase.

        Args:
            iteration: the engine's iteration counter during the step.

        Returns:
            ``iteration > divergence_aware_start_iteration``.
        """
        return iteration > self.divergence_aware_start_iteration

    def _iteration(self, engine: Engine, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        device = engine.state.device
        keys = [self.target_key, *self.condition_keys]
        missing = [k for k in keys if k not in batchdata]
        if missing:
            raise KeyError(f"DAMMDiffusionTrainer: batch lacks latents {missing}; keys: {sorted(batchdata)}")
        z0 = torch.as_tensor(batchdata[self.target_key]).to(device, non_blocking=self.non_blocking).float()
        conds = [torch.as_tensor(batchdata[k]).to(device).float() for k in self.condition_keys]
        noise = torch.randn_like(z0)
        n_steps = int(self.inferer.scheduler.num_train_timesteps)
        timesteps = torch.randint(0, n_steps, (z0.shape[0],), device=device, dtype=torch.long)
        calibration = self.calibrating(engine.state.iteration)
        phase_b = calibration or self.divergence_aware(engine.state.iteration)
        mismatch = None
        if phase_b and self.correspondence_label:
            conds, mismatch = mismatch_auxiliary(conds, self.gate_mismatch_fraction)
        self.network.train(not calibration)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.precision, device):
            output = self.inferer.noise_prediction(self.network, z0, conds, noise, timesteps, use_uncertainty=phase_b)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        scheduler = self.inferer.scheduler
        target = diffusion_target(scheduler, z0, noise, timesteps)
        weights = min_snr_weights(scheduler, timesteps, self.min_snr_gamma) if self.min_snr_gamma > 0 else None
        extra: dict[str, Any] = {} if weights is None else {"weights": weights}
        if phase_b and self.averaged_label:
            extra["label_losses"] = self._label_losses(z0, conds)
        if calibration:
            extra["calibration"] = True
        if mismatch is not None:
            extra["mismatch"] = mismatch
        loss, logs = self.loss_function(output, target, divergence_aware=phase_b, **extra)
        if isinstance(self.network, torch.nn.parallel.DistributedDataParallel):
            # DDP needs every output in the graph of the loss: the confidence (unused in the warm-up) and the
            # gated prediction join with weight 0, so their parameters get zero gradients instead of none
            loss = loss + 0.0 * sum(t.float().sum() for t in (output.confidence_map, output.eps))
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if self.grad_scaler is None:
            loss.backward()
        else:
            self.grad_scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if calibration:  # the denoiser is frozen: only the confidence path steps (AdamW skips grad=None)
            keep = {id(p) for _, p in confidence_parameters(self.network)}
            for p in self.network.parameters():
                if id(p) not in keep:
                    p.grad = None
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)  # clip (and step) on the true gradients
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), float(self.grad_clip_norm))
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        result: dict[str, Any] = {k: float(v) for k, v in logs.items()}
        result["loss"] = float(loss.detach())
        result["divergence_aware"] = float(phase_b)
        result["gate_calibration"] = float(calibration)
        result.update(self._label_diagnosis(timesteps, batchdata.get("divergent")))
        result.update(_confidence_by_subset(output.confidence, batchdata.get("divergent")))
        return result

    @torch.no_grad()
    def _label_losses(self, z0: torch.Tensor, conds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Branch errors at ``gate_label_timesteps`` fresh ``(t, eps)`` draws per sample, ``[B, M]`` each."""
        n_steps = int(self.inferer.scheduler.num_train_timesteps)
        uni, multi = [], []
        for _ in range(self.gate_label_timesteps):
            t = torch.randint(0, n_steps, (z0.shape[0],), device=z0.device, dtype=torch.long)
            noise = torch.randn_like(z0)
            with autocast(self.precision, z0.device):
                out = self.inferer.noise_prediction(self.network, z0, conds, noise, t, use_uncertainty=True)
            target = diffusion_target(self.inferer.scheduler, z0, noise, t)
            w = min_snr_weights(self.inferer.scheduler, t, self.min_snr_gamma) if self.min_snr_gamma > 0 else None
            l_u, l_m = branch_errors(out, target, w)
            uni.append(l_u)
            multi.append(l_m)
        return torch.stack(uni, dim=1), torch.stack(multi, dim=1)

    def _label_diagnosis(self, timesteps: torch.Tensor, divergent: Any) -> dict[str, float]:
        """Epoch-to-date label rate per timestep bucket (and agreement with a ``divergent`` flag)."""
        label = getattr(self.loss_function, "last_label", None)
        if label is None:
            return {}
        label = label.detach().float().cpu().reshape(-1)
        mask = getattr(self.loss_function, "last_label_mask", None)
        given = torch.ones_like(label, dtype=torch.bool) if mask is None else mask.detach().cpu().reshape(-1)
        t = timesteps.detach().cpu()
        out = {}
        for i, (lo, hi, key) in enumerate(self.buckets):
            sel = given & (t >= lo) & (t < hi)
            self._label_counts[i] += torch.stack([label[sel].sum(), sel.sum()]).double()
            ones, total = self._label_counts[i].tolist()
            out[key] = ones / total if total else float("nan")
        if divergent is not None:
            consistent = ~torch.as_tensor(divergent).reshape(-1).bool().cpu()
            agree = (label.bool() == consistent)[given]
            self._label_counts[-1] += torch.tensor([float(agree.sum()), float(agree.numel())], dtype=torch.float64)
            ones, total = self._label_counts[-1].tolist()
            out["label_divergence_agreement"] = ones / total if total else float("nan")
        return out

"""DAMM-Diffusion sampling: a MONAI ``Inferer`` that turns condition images into the target modality.

:class:`DAMMInferer` encodes the condition images with their (frozen) autoencoders, runs the reverse diffusion in
latent space with MONAI's ``DDPMScheduler`` (the paper: all 1000 steps), ``DDIMScheduler`` (``N`` steps, ``eta``),
``PNDMScheduler`` (PLMS, ``N`` steps) or DPM-Solver++(2M) (``N`` steps; all built by :mod:`damm.schedulers`), lets
the denoiser's DAMMP gate pick the uni- or multi-modal noise prediction at every step (or forces one branch; the
multistep solvers keep the chosen prediction as their history), and decodes with the target autoencoder. It draws
``K`` samples per input (mean and per-pixel standard deviation), is seeded, and also returns the UAFM confidence map,
the per-step branch choices and one decision per sample.

The gating decision (``gate_decision``): ``"per_step"`` (the paper) compares ``c`` with ``gamma`` at every step;
``"per_sample"`` decides once per sample from ``c`` averaged over the first ``gate_decision_steps`` steps (during
those steps the running mean of ``c`` so far decides) and keeps that branch for every later step; ``"blend"`` uses
``c · eps_multi + (1 - c) · eps_uni`` at every step (a soft gate: no hard choice, so a doubtful ``c`` near
``gamma`` averages the two predictions instead of betting on one; the reported choices are then ``c >= gamma``,
the branch with the larger weight when ``gamma`` = 0.5).

``network`` is a :class:`damm.model.DAMMModel` (the autoencoders of every modality plus the denoiser) or any
object with the same attributes (``autoencoders``, ``denoiser``, ``target``, ``conditions``), so that
``inferer(inputs, network)`` works as MONAI Label calls a bundle inferer.

Mixed precision (``precision``: ``"fp32"``, ``"bf16"``, ``"fp16"`` CUDA only; see ``ddcore.precision``): the
denoiser and the autoencoders run under ``torch.autocast``; their outputs are upcast to fp32, the running latent
stays fp32 and every scheduler step is computed in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from torch import nn

from damm import schedulers
from ddcore.device import module_device
from ddcore.precision import autocast, canonical_precision, check_precision

__all__ = ["BRANCHES", "GATE_DECISIONS", "DAMMInferer", "DAMMSampleOutput"]

BRANCHES = ("damm", "uni", "multi")
GATE_DECISIONS = ("per_step", "per_sample", "blend")


@dataclass
class DAMMSampleOutput:
    """Everything one :meth:`DAMMInferer.sample` call produces (tensors on the CPU).

    Attributes:
        prediction: decoded target image, mean over the K samples, ``[B, C, *spatial]``.
        std: per-pixel standard deviation over the K samples (zeros when K = 1), same shape.
        samples: the K decoded samples ``[B, K, C, *spatial]`` (only when requested, else ``None``).
        confidence_map: UAFM confidence ``u`` averaged over steps and samples, resized to the image,
            ``[B, 1, *spatial]`` (``None`` for ``branch="uni"``, which does not run the fusion).
        confidence: confidence ``c`` per input, sample and step, ``[B, K, S]`` (``None`` for ``branch="uni"``).
        branch_choices: the branch used at every step, ``True`` = multi-modal, ``[B, K, S]`` (bool); under
            ``gate_decision="blend"`` the branch with the larger weight (``c >= gamma``).
        gate_choices: what the DAMMP gate chose at every step (``c >= gamma``, or the per-sample decision under
            ``gate_decision="per_sample"``), ``[B, K, S]``, whatever branch was forced (``None`` for ``branch="uni"``).
        timesteps: the S timesteps visited, in order.
        settings: branch, sampler, steps, eta, K, seed, precision, gate decision.
        sample_choices: the gate's decision per sample, ``True`` = multi-modal, ``[B, K]``: under ``per_sample`` the
            one decision, under ``per_step`` whether at least half of the steps were gated to multi (``None`` for
            ``branch="uni"``).
    """

    prediction: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor | None
    confidence_map: torch.Tensor | None
    confidence: torch.Tensor | None
    branch_choices: torch.Tensor
    gate_choices: torch.Tensor | None
    timesteps: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    sample_choices: torch.Tensor | None = None

    def statistics(self) -> list[dict[str, Any]]:
        """Per-input branch statistics for sidecars and reports.

        Returns:
            One dict per input: fraction of steps that used / were gated to the multi-modal branch, fraction of its K
            samples the gate sent to multi (``multi_sample_fraction``), mean confidence, and the per-step choice of
            the first sample (``"m"``/``"u"`` string, first step first).
        """
        stats = []
        for i in range(self.prediction.shape[0]):
            rec: dict[str, Any] = {
                "multi_step_fraction": float(self.branch_choices[i].float().mean()),
                "steps_first_sample": "".join("m" if c else "u" for c in self.branch_choices[i, 0].tolist()),
            }
            if self.gate_choices is not None:
                rec["gated_multi_fraction"] = float(self.gate_choices[i].float().mean())
            if self.sample_choices is not None:
                rec["multi_sample_fraction"] = float(self.sample_choices[i].float().mean())
            if self.confidence is not None:
                rec["confidence_mean"] = float(self.confidence[i].mean())
            stats.append(rec)
        return stats


class DAMMInferer(Inferer):
    """Latent DAMM-Diffusion sampler (and the noisy-input helper used by the diffusion trainer).

    Args:
        scheduler: the training noise scheduler (MONAI ``DDPMScheduler``: 1000 steps, ``scaled_linear_beta``
            0.002 -> 0.02, epsilon prediction, ``clip_sample=False``). Used to add noise during training and,
            when ``sampler="ddpm"``, to sample.
        sampler: ``"ddpm"`` (ancestral, the paper; always all training steps), ``"ddim"``, ``"pndm"`` (PLMS; the
            denoiser runs ``N + 1`` times) or ``"dpm_solver"`` (DPM-Solver++(2M)); see :mod:`damm.schedulers`. The
            last two are deterministic and need far fewer steps than DDIM.
        num_inference_steps: sampling steps (``None``: all training steps); DDPM needs all of them.
        eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like); used by DDIM only.
        branch: ``"damm"`` (DAMMP-gated), ``"uni"`` or ``"multi"``.
        num_samples: K samples per input; the prediction is their mean.
        seed: seed of the sampling noise (``None``: the global RNG).
        batch_size: inputs sampled together (``K`` copies each); ``None`` = all at once. No default: the bundle
            sets it per run (``eval_batch_size`` in training, the loader's ``batch_size`` in inference).
        progress: show a tqdm bar over the sampling steps.
        keep_samples: keep the K individual samples in the output.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only): autocast dtype of the denoiser and
            autoencoder passes. The name is checked here, the device when sampling (before any work).
        gate_decision: ``"per_step"`` (the paper), ``"per_sample"`` or ``"blend"`` (see the module docstring).
        gate_decision_steps: steps whose mean ``c`` makes the per-sample decision (at most all steps).

    Raises:
        ValueError: for an unknown ``sampler``/``branch``/``precision``/``gate_decision``, ``num_samples < 1``,
            ``gate_decision_steps < 1`` or DDPM with fewer steps.
    """

    def __init__(
        self,
        scheduler: DDPMScheduler,
        sampler: str = "ddim",
        num_inference_steps: int | None = 50,
        eta: float = 1.0,
        branch: str = "damm",
        num_samples: int = 1,
        seed: int | None = 0,
        *,
        batch_size: int | None,
        progress: bool = True,
        keep_samples: bool = False,
        precision: str = "fp32",
        gate_decision: str = "per_step",
        gate_decision_steps: int = 10,
    ) -> None:
        super().__init__()
        # the name now (no device yet: fp16 is accepted here and refused at sampling time off CUDA)
        precision = canonical_precision(precision)
        schedulers.check_sampler(sampler)
        if branch not in BRANCHES:
            raise ValueError(f"DAMMInferer: branch must be one of {BRANCHES}, got {branch!r}")
        if int(num_samples) < 1:
            raise ValueError(f"DAMMInferer: num_samples must be >= 1, got {num_samples}")
        if gate_decision not in GATE_DECISIONS:
            raise ValueError(f"DAMMInferer: gate_decision must be one of {GATE_DECISIONS}, got {gate_decision!r}")
        if int(gate_decision_steps) < 1:
            raise ValueError(f"DAMMInferer: gate_decision_steps must be >= 1, got {gate_decision_steps}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"DAMMInferer: batch_size must be >= 1 or None, got {batch_size}")
        self.scheduler = scheduler
        self.sampler = sampler
        self.num_train_timesteps = int(scheduler.num_train_timesteps)
        steps = self.num_train_timesteps if num_inference_steps is None else int(num_inference_steps)
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(
                f"DAMMInferer: num_inference_steps must be in [1, {self.num_train_timesteps}], "
                f"got {num_inference_steps}"
            )
        if sampler == "ddpm" and steps != self.num_train_timesteps:
            raise ValueError(
                f"DAMMInferer: DDPM sampling runs all {self.num_train_timesteps} steps (MONAI's DDPMScheduler.step "
                f"assumes consecutive timesteps); got num_inference_steps={num_inference_steps}. Use sampler='ddim' "
                "(or 'dpm_solver', 'pndm') for fewer steps."
            )
        self.num_inference_steps = steps
        self.eta = float(eta)
        self.branch = branch
        self.num_samples = int(num_samples)
        self.seed = seed
        self.batch_size = None if batch_size is None else int(batch_size)
        self.progress = progress
        self.keep_samples = keep_samples
        self.precision = precision
        self.gate_decision = gate_decision
        self.gate_decision_steps = int(gate_decision_steps)

    def check_device(self, device: torch.device | str) -> None:
        """Check that ``precision`` can run on ``device`` (called before sampling starts).

        Args:
            device: the network's device.

        Raises:
            ValueError: fp16 off CUDA, or bf16 on a GPU without bf16 (the message names ``precision``).
        """
        check_precision(self.precision, device, setting="precision")

    # ------------------------------------------------------------------ schedulers
    def make_sampling_scheduler(self) -> Scheduler:
        """A fresh scheduler for one sampling run (:func:`damm.schedulers.make_sampling_scheduler`).

        Every sampler gets the training schedule (same ``betas``), ``clip_sample=False`` and the training prediction
        type; its timesteps are set for ``num_inference_steps``.

        Returns:
            A fresh scheduler (so concurrent runs do not share state, nor multistep solvers their history).
        """
        return schedulers.make_sampling_scheduler(self.sampler, self.scheduler, self.num_inference_steps)

    def settings(self) -> dict[str, Any]:
        """The sampling settings (for sidecars and reports).

        Returns:
            JSON-serialisable dict.
        """
        return {
            "branch": self.branch,
            "sampler": self.sampler,
            "num_inference_steps": self.num_inference_steps,
            "num_train_timesteps": self.num_train_timesteps,
            "eta": self.eta if self.sampler == "ddim" else None,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "precision": self.precision,
            "gate_decision": self.gate_decision,
            "gate_decision_steps": self.gate_decision_steps if self.gate_decision == "per_sample" else None,
        }

    # ------------------------------------------------------------------ training helper
    def noise_prediction(
        self,
        denoiser: nn.Module,
        latents: torch.Tensor,
        conditions: Sequence[torch.Tensor],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        use_uncertainty: bool = True,
    ) -> Any:
        """Noise the target latents and run every branch of the denoiser (training pass).

        Args:
            denoiser: a ``DAMMDenoiser`` (its ``forward_all`` is called), or a ``DistributedDataParallel`` wrapping
                a :class:`damm.engines.ForwardAll` adapter (called directly so DDP can synchronise gradients).
            latents: scaled target latents ``z_0`` ``[B, C, *spatial]``.
            conditions: scaled condition latents, anchor first.
            noise: ``eps`` with the shape of ``latents``.
            timesteps: ``[B]`` integer steps.
            use_uncertainty: UAFM multiplies its logits by ``u`` (False in the warm-up phase).

        Returns:
            The denoiser's ``DAMMOutput``.
        """
        noisy = self.scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
        x = torch.cat([noisy, *conditions], dim=1)
        forward_all = getattr(denoiser, "forward_all", None)
        if forward_all is None:  # DDP(ForwardAll(denoiser))
            return denoiser(x, timesteps, use_uncertainty)
        return forward_all(x, timesteps, use_uncertainty=use_uncertainty)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _split_conditions(inputs: Any, network: Any) -> list[torch.Tensor]:
        conditions = list(network.conditions)
        if isinstance(inputs, Mapping):
            missing = [k for k in conditions if k not in inputs]
            if missing:
                raise ValueError(f"DAMMInferer: inputs lack the condition modalities {missing}; got {sorted(inputs)}")
            return [torch.as_tensor(inputs[k]) for k in conditions]
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != len(conditions):
                raise ValueError(
                    f"DAMMInferer: expected {len(conditions)} condition images {conditions}, got {len(inputs)}"
                )
            return [torch.as_tensor(x) for x in inputs]
        x = torch.as_tensor(inputs)
        per = [int(network.autoencoders[k].in_channels) for k in conditions]
        if x.ndim < 3 or x.shape[1] != sum(per):
            raise ValueError(
                f"DAMMInferer: a stacked input must be [B, {sum(per)}, *spatial] (channels: "
                f"{dict(zip(conditions, per))}), got shape {tuple(x.shape)}"
            )
        return list(torch.split(x, per, dim=1))

    @torch.no_grad()
    def encode_conditions(self, network: Any, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Scaled condition latents, anchor first.

        Args:
            network: the composite model.
            images: condition images in ``network.conditions`` order.

        Returns:
            ``[z_anchor, z_aux_1, ...]`` (fp32).
        """
        device = module_device(network.denoiser)
        self.check_device(device)
        latents = []
        for k, x in zip(network.conditions, images):
            with autocast(self.precision, device):
                z = network.autoencoders[k].encode_scaled(x.to(device=device, dtype=torch.float32))
            latents.append(z.float())
        return latents

    @torch.no_grad()
    def sample_latents(
        self, network: Any, conditions: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Reverse diffusion in latent space for one batch of condition latents (``K`` copies each).

        Args:
            network: the composite model (its ``denoiser`` is used).
            conditions: scaled condition latents ``[B, C, *spatial]`` each, anchor first.
            generator: CPU random generator for the initial and per-step noise (``None``: a new one seeded with
                ``seed``, or the global RNG when ``seed`` is ``None``).

        Returns:
            Dict with ``latents`` ``[B*K, C, *spatial]`` (sample-major within each input), ``u`` (mean confidence map
            ``[B*K, 1, *bottleneck]`` or None), ``confidence`` ``[B*K, S]`` or None, ``choices`` ``[B*K, S]``,
            ``gate`` ``[B*K, S]`` or None, ``decision`` (the gate's per-sample decision ``[B*K]`` or None),
            ``timesteps``.
        """
        denoiser = network.denoiser
        k = self.num_samples
        conds = [c.repeat_interleave(k, dim=0) for c in conditions]
        b = conds[0].shape[0]
        lat_channels = int(getattr(denoiser, "latent_channels", conds[0].shape[1]))
        shape = (b, lat_channels, *conds[0].shape[2:])
        device = conds[0].device
        self.check_device(device)
        if generator is None:
            generator = self.make_generator()
        x = torch.randn(shape, generator=generator).to(device)  # the running latent: fp32 throughout
        sched = self.make_sampling_scheduler()
        timesteps = [int(t) for t in sched.timesteps]
        cond = torch.cat([c.float() for c in conds], dim=1)
        gamma = float(getattr(denoiser, "gamma", 0.5))
        choices, gates, confs = [], [], []
        u_sum = None
        per_sample = self.gate_decision == "per_sample"
        window = min(self.gate_decision_steps, len(timesteps))
        c_sum = torch.zeros(b, device=device)
        iterator: Any = timesteps
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(timesteps, desc=f"sampling ({self.branch}, {self.sampler}-{len(timesteps)})", leave=False)
        for step, t in enumerate(iterator):
            t_batch = torch.full((b,), t, device=device, dtype=torch.long)
            inp = torch.cat([x, cond], dim=1)
            if self.branch == "uni" and hasattr(denoiser, "forward_all"):
                saved = denoiser.branch
                denoiser.branch = "uni"
                try:
                    with autocast(self.precision, device):
                        eps = denoiser(inp, t_batch)
                finally:
                    denoiser.branch = saved
                choices.append(torch.zeros(b, dtype=torch.bool))
            else:
                with autocast(self.precision, device):
                    out = denoiser.forward_all(inp, t_batch, use_uncertainty=True)
                # the gating decision in fp32 (the DAMMDenoiser already returns fp32; other networks may not)
                confidence = out.confidence.float()
                to_multi = confidence >= gamma
                if per_sample:  # the running mean over the decision window, then the window's decision
                    if step < window:
                        c_sum = c_sum + confidence
                    to_multi = c_sum / min(step + 1, window) >= gamma
                gate = to_multi.cpu()
                if self.branch == "damm" and self.gate_decision == "blend":
                    weight = confidence.clamp(0.0, 1.0).reshape(-1, *([1] * (out.eps_uni.ndim - 1)))
                    eps = weight * out.eps_multi.float() + (1.0 - weight) * out.eps_uni.float()
                    choices.append(to_multi.cpu())
                elif self.branch == "damm":
                    eps = torch.where(
                        to_multi.reshape(-1, *([1] * (out.eps_uni.ndim - 1))),
                        out.eps_multi.float(),
                        out.eps_uni.float(),
                    )
                    choices.append(to_multi.cpu())
                else:
                    eps = out.eps_multi
                    choices.append(torch.ones(b, dtype=torch.bool))
                gates.append(gate)
                confs.append(confidence.cpu())
                u = out.confidence_map.float()
                u_sum = u if u_sum is None else u_sum + u
            x = self._step(sched, eps.float(), t, x, generator)  # scheduler arithmetic in fp32
        n = len(timesteps)
        decision = None
        if gates:
            decision = (c_sum / window >= gamma).cpu() if per_sample else torch.stack(gates, 1).float().mean(1) >= 0.5
        return {
            "decision": decision,
            "latents": x,
            "u": None if u_sum is None else (u_sum / n).cpu(),
            "confidence": torch.stack(confs, dim=1) if confs else None,
            "choices": torch.stack(choices, dim=1),
            "gate": torch.stack(gates, dim=1) if gates else None,
            "timesteps": timesteps,
        }

    def make_generator(self) -> torch.Generator | None:
        """A CPU generator seeded with ``seed`` (``None`` when ``seed`` is ``None``).

        Returns:
            The generator or ``None``.
        """
        if self.seed is None:
            return None
        return torch.Generator(device="cpu").manual_seed(int(self.seed))

    def replace(self, **changes: Any) -> DAMMInferer:
        """A new inferer with some settings changed (e.g. ``branch="uni"`` or ``sampler="ddpm"``).

        Args:
            **changes: constructor arguments to change.

        Returns:
            The new :class:`DAMMInferer`.
        """
        args = {
            "scheduler": self.scheduler,
            "sampler": self.sampler,
            "num_inference_steps": self.num_inference_steps,
            "eta": self.eta,
            "branch": self.branch,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "progress": self.progress,
            "keep_samples": self.keep_samples,
            "precision": self.precision,
            "gate_decision": self.gate_decision,
            "gate_decision_steps": self.gate_decision_steps,
        }
        args.update(changes)
        if args["sampler"] == "ddpm" and "num_inference_steps" not in changes:
            args["num_inference_steps"] = None
        return DAMMInferer(**args)

    def _step(self, sched: Any, eps: torch.Tensor, t: int, x: torch.Tensor, generator: Any) -> torch.Tensor:
        if isinstance(sched, DDIMScheduler):
            if self.eta > 0:
                # MONAI's DDIM draws its noise on the sample's device with the given generator (CPU here)
                prev, _ = sched.step(eps.cpu(), t, x.cpu(), eta=self.eta, generator=generator)
                return prev.to(x.device)
            prev, _ = sched.step(eps, t, x, eta=0.0)
            return prev
        if not isinstance(sched, DDPMScheduler):  # PNDM, DPM-Solver++: deterministic, on the latent's device
            prev, _ = sched.step(eps, t, x)
            return prev
        prev, _ = sched.step(eps.cpu(), t, x.cpu(), generator=generator)
        return prev.to(x.device)

    @torch.no_grad()
    def sample(self, inputs: Any, network: Any) -> DAMMSampleOutput:
        """Synthesise the target modality for a batch of inputs.

        Args:
            inputs: condition images: a ``[B, sum(C_k), *spatial]`` tensor with the conditions stacked along the
                channels in ``network.conditions`` order (anchor first), a list of ``[B, C_k, *spatial]`` tensors in
                that order, or a dict keyed by condition name.
            network: the composite model (``autoencoders``, ``denoiser``, ``target``, ``conditions``).

        Returns:
            :class:`DAMMSampleOutput`.

        Raises:
            ValueError: bad inputs, or a ``precision`` the network's device cannot run (before any work).
        """
        images = self._split_conditions(inputs, network)
        device = module_device(network.denoiser)
        self.check_device(device)
        n = images[0].shape[0]
        bs = n if self.batch_size is None else self.batch_size
        was_training = network.training
        network.eval()
        parts: list[dict[str, Any]] = []
        generator = self.make_generator()
        try:
            for start in range(0, n, bs):
                chunk = [im[start : start + bs] for im in images]
                latents = self.encode_conditions(network, chunk)
                res = self.sample_latents(network, latents, generator)
                with autocast(self.precision, device):
                    decoded = network.autoencoders[network.target].decode_scaled(res["latents"])
                decoded = decoded.float().cpu()
                res["decoded"] = decoded
                res["size"] = chunk[0].shape[2:]
                parts.append(res)
        finally:
            network.train(was_training)
        return self._collect(parts, n)

    def _collect(self, parts: list[dict[str, Any]], n: int) -> DAMMSampleOutput:
        k = self.num_samples
        decoded = torch.cat([p["decoded"] for p in parts])
        samples = decoded.reshape(n, k, *decoded.shape[1:])
        prediction = samples.mean(dim=1)
        std = samples.std(dim=1, unbiased=False) if k > 1 else torch.zeros_like(prediction)

        def _per_input(key: str) -> torch.Tensor | None:
            if parts[0][key] is None:
                return None
            v = torch.cat([p[key] for p in parts])
            return v.reshape(n, k, *v.shape[1:])

        u_map = None
        if parts[0]["u"] is not None:
            size = tuple(int(s) for s in parts[0]["size"])
            u = torch.cat([p["u"] for p in parts])
            mode = "bilinear" if len(size) == 2 else "trilinear"
            u = F.interpolate(u, size=size, mode=mode, align_corners=False)
            u_map = u.reshape(n, k, *u.shape[1:]).mean(dim=1)
        return DAMMSampleOutput(
            prediction=prediction,
            std=std,
            samples=samples if self.keep_samples else None,
            confidence_map=u_map,
            confidence=_per_input("confidence"),
            branch_choices=_per_input("choices"),
            gate_choices=_per_input("gate"),
            timesteps=parts[0]["timesteps"],
            settings=self.settings(),
            sample_choices=_per_input("decision"),
        )

    def __call__(self, inputs: Any, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """MONAI ``Inferer`` entry point: ``inferer(inputs, network)`` -> the synthesised target image.

        Args:
            inputs: stacked condition images ``[B, sum(C_k), *spatial]`` (or a list / dict; see :meth:`sample`).
            network: the composite model.
            args: unused (MONAI ``Inferer`` signature).
            kwargs: unused.

        Returns:
            ``[B, C, *spatial]`` prediction (mean over K samples), on the input's device.
        """
        out = self.sample(inputs, network)
        device = inputs.device if isinstance(inputs, torch.Tensor) else torch.device("cpu")
        return out.prediction.to(device)

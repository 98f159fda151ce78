"""DAMM-Diffusion training loss (spec ``damm.md`` §3.2), batched, plus a per-sample reference.

Warm-up phase: ``1/2 (L1(eps_uni, eps) + L1(eps_multi, eps))``.

Divergence-aware phase, per sample i: ``l_uni_i``, ``l_multi_i`` (mean L1), label ``y_i = [l_multi_i <= l_uni_i]``
(no gradient); denoising term ``l_uni_i`` where ``c_i < gamma`` else ``1/2 (l_uni_i + l_multi_i)`` (so the
multi-modal branch gets no noise-prediction gradient from samples gated to the uni-modal branch); confidence term
``bce_weight * BCE(c, y) + pull_weight * mean((c - gamma)^2)`` weighted by ``alpha``. Total:
``mean_i(denoising_i) + alpha * confidence_term``.

Gate training (issue 14; ``gate_training="paper"`` with the other gate settings at their defaults is the formula
above, exactly): ``"averaged"`` takes the label from the branch errors averaged over the training timestep and the
extra timesteps the trainer draws per sample (``label_losses``), so that one noise draw no longer decides it;
``gate_label_margin`` leaves samples whose two errors differ by less than that share of their mean without a label
(masked from the BCE); ``gate_balance`` weights both classes equally in the BCE; ``gate_temperature`` T scores
``sigmoid(logit(c) / T)`` in the BCE; ``gate_branch_loss="both"`` trains both branches on every sample in the
divergence-aware phase (the paper's ``"gated"`` starves the multi-modal branch of the samples the gate sends to uni,
which lowers its quality, which sends more samples to uni: measured, ``benchmarks/damm_gate.py``, the gate and the
multi-modal branch collapse together). The calibration phase (``calibration=True``) uses the confidence term alone.

``gate_training="correspondence"`` (not in the paper) takes the label from the data instead of the branch errors:
the trainer replaces the auxiliary latents of a random share of the batch by mismatched ones
(:func:`mismatch_auxiliary`: another sample's, spatially shifted, or flipped), which get ``y = 0``; the genuine
pairs get ``y = 1``. Mismatched samples train only the uni-modal branch (their multi-modal prediction would learn
from a pair that does not belong together). ``benchmarks/damm_gate_label.py`` measured why: under the paper's
label the branch-error comparison is close to a coin toss per draw on the main job's data.

Mixed precision: the loss is an fp32 island (``ddcore.precision.fp32``): predictions, noise and confidence are
upcast from bf16/fp16 before any arithmetic, so the loss is fp32 whether or not it is called under autocast.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from damm.networks.denoiser import DAMMDenoiser, DAMMOutput
from ddcore.precision import fp32, upcast

__all__ = [
    "GATE_BRANCH_LOSS",
    "GATE_TRAINING",
    "DAMMLoss",
    "branch_errors",
    "diffusion_target",
    "min_snr_weights",
    "mismatch_auxiliary",
    "per_sample_reference_loss",
]

#: ``gate_training`` options: the paper's single-timestep label, the label averaged over several timesteps, or the
#: correspondence label (genuine condition pairs 1, mismatched ones made by the trainer 0).
GATE_TRAINING = ("paper", "averaged", "correspondence")
#: the kinds of mismatch :func:`mismatch_auxiliary` makes.
MISMATCH_KINDS = ("swap", "shift", "flip")
#: ``gate_branch_loss`` options of the divergence-aware phase's denoising term: ``"gated"`` (the paper: the
#: multi-modal branch learns only from samples the gate sends to it) or ``"both"`` (both branches on every sample).
GATE_BRANCH_LOSS = ("gated", "both")


def _per_sample_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (upcast(pred) - upcast(target)).abs().flatten(1).mean(dim=1)


def branch_errors(
    output: DAMMOutput, target: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean L1 of both branches, ``(l_uni, l_multi)``, each ``[B]`` fp32, optionally weighted.

    Args:
        output: the denoiser's output.
        target: the regression target (shape of ``output.eps_uni``).
        weights: optional per-sample weights ``[B]`` (e.g. :func:`min_snr_weights`).

    Returns:
        ``(l_uni, l_multi)``.
    """
    l_uni = _per_sample_l1(output.eps_uni, target)
    l_multi = _per_sample_l1(output.eps_multi, target)
    if weights is not None:
        w = upcast(weights).reshape(-1).to(l_uni.device)
        l_uni, l_multi = l_uni * w, l_multi * w
    return l_uni, l_multi


class DAMMLoss(nn.Module):
    """Two-phase DAMM loss computed for the whole batch at once.

    Args:
        gamma: DAMMP threshold (use the same value as the denoiser's ``gamma``).
        alpha: weight of the confidence term (paper: 1e-4).
        bce_weight: weight of ``BCE(c, y)`` inside the confidence term (paper: 0.5).
        pull_weight: weight of ``mean((c - gamma)^2)`` inside the confidence term (paper: 1).
        gate_training: ``"paper"`` (the label at the training timestep), ``"averaged"`` (the label from the branch
            errors averaged over that and the trainer's extra timesteps, ``label_losses``) or ``"correspondence"``
            (genuine pairs 1, the trainer's mismatched pairs 0; see the module docstring).
        gate_label_margin: ``>= 0``; a sample whose errors differ by less than this share of their mean gets no label
            (it is left out of the BCE); 0 (the paper): every sample is labelled.
        gate_balance: weight the two label classes equally in the BCE (False: the paper's plain mean).
        gate_temperature: ``> 0``; the BCE scores ``sigmoid(logit(c) / T)`` (1: the paper's ``c``). The pull term and
            the gating decision use ``c`` itself.

    Attributes:
        last_label: the label ``y`` of the last call, ``[B]`` (detached), for diagnostics.
        last_label_mask: which samples of the last call had a label (``None``: all of them).

    Raises:
        ValueError: for ``gamma`` outside (0, 1), negative weights or margin, an unknown ``gate_training`` or a
            temperature ``<= 0``.
    """

    def __init__(
        self,
        gamma: float = 0.5,
        alpha: float = 1e-4,
        bce_weight: float = 0.5,
        pull_weight: float = 1.0,
        gate_training: str = "paper",
        gate_label_margin: float = 0.0,
        gate_balance: bool = False,
        gate_temperature: float = 1.0,
        gate_branch_loss: str = "gated",
    ):
        super().__init__()
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
        for name, value in (
            ("alpha", alpha),
            ("bce_weight", bce_weight),
            ("pull_weight", pull_weight),
            ("gate_label_margin", gate_label_margin),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if gate_training not in GATE_TRAINING:
            raise ValueError(f"gate_training must be one of {GATE_TRAINING}, got {gate_training!r}")
        if gate_branch_loss not in GATE_BRANCH_LOSS:
            raise ValueError(f"gate_branch_loss must be one of {GATE_BRANCH_LOSS}, got {gate_branch_loss!r}")
        if not float(gate_temperature) > 0:
            raise ValueError(f"gate_temperature must be > 0, got {gate_temperature}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.bce_weight = float(bce_weight)
        self.pull_weight = float(pull_weight)
        self.gate_training = gate_training
        self.gate_label_margin = float(gate_label_margin)
        self.gate_balance = bool(gate_balance)
        self.gate_temperature = float(gate_temperature)
        self.gate_branch_loss = gate_branch_loss
        self.last_label: torch.Tensor | None = None
        self.last_label_mask: torch.Tensor | None = None

    def gate_label(
        self,
        l_uni: torch.Tensor,
        l_multi: torch.Tensor,
        label_losses: tuple[torch.Tensor, torch.Tensor] | None = None,
        mismatch: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The BCE label ``y = [l_multi <= l_uni]`` per sample and which samples get one.

        Args:
            l_uni: uni-modal error per sample at the training timestep, ``[B]``.
            l_multi: multi-modal error, ``[B]``.
            label_losses: ``(l_uni_extra, l_multi_extra)``, ``[B, M]`` each, the errors at ``M`` further timesteps
                (used by ``gate_training="averaged"``, which averages over all ``1 + M``; ignored by ``"paper"``).
            mismatch: ``[B]`` bool, the samples whose auxiliary latents the trainer mismatched (used by
                ``gate_training="correspondence"``: ``y = not mismatch``; all 1 when ``None``).

        Returns:
            ``(label, mask)``: ``label`` ``[B]`` float in {0, 1} (no gradient); ``mask`` ``[B]`` bool, ``None`` when
            ``gate_label_margin`` is 0 (every sample labelled).
        """
        lu, lm = l_uni.detach(), l_multi.detach()
        if self.gate_training == "correspondence":
            genuine = torch.ones_like(lu, dtype=torch.bool) if mismatch is None else ~mismatch.to(lu.device).bool()
            return genuine.float(), None
        if self.gate_training == "averaged" and label_losses is not None:
            eu, em = (upcast(t.detach()).to(lu.device).reshape(lu.shape[0], -1) for t in label_losses)
            lu = torch.cat([lu[:, None], eu], dim=1).mean(dim=1)
            lm = torch.cat([lm[:, None], em], dim=1).mean(dim=1)
        label = (lm <= lu).float()
        mask = None
        if self.gate_label_margin > 0:
            mask = (lu - lm).abs() >= self.gate_label_margin * 0.5 * (lu + lm)
        return label, mask

    def confidence_loss(
        self, confidence: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``bce_weight * BCE(c, y) + pull_weight * mean((c - gamma)^2)``.

        With the gate settings at their defaults this is the paper's term exactly; otherwise the BCE is the mean
        over the labelled samples (``mask``; 0 when none is), class-balanced (``gate_balance``: each present class
        weighs half) and scored on ``sigmoid(logit(c) / gate_temperature)``.

        Args:
            confidence: ``c`` per sample, ``[B]`` in (0, 1).
            label: ``y`` per sample, ``[B]`` in {0, 1}.
            mask: which samples have a label (``None``: all).

        Returns:
            Scalar.
        """
        c = confidence.float()
        eps = torch.finfo(c.dtype).eps
        with fp32(c.device):  # BCE is unsafe under (CUDA) autocast
            pull = self.pull_weight * ((c - self.gamma) ** 2).mean()
            if mask is None and not self.gate_balance and self.gate_temperature == 1.0:  # the paper's term
                bce = F.binary_cross_entropy(c.clamp(eps, 1.0 - eps), label.float())
                return self.bce_weight * bce + pull
            y = label.float()
            scored = c.clamp(eps, 1.0 - eps)
            if self.gate_temperature != 1.0:
                scored = torch.sigmoid(torch.logit(scored) / self.gate_temperature).clamp(eps, 1.0 - eps)
            per = F.binary_cross_entropy(scored, y, reduction="none")
            w = torch.ones_like(y) if mask is None else mask.float()
            n = w.sum()
            if self.gate_balance:
                n_pos, n_neg = (w * y).sum(), (w * (1 - y)).sum()
                classes = (n_pos > 0).float() + (n_neg > 0).float()
                w_pos = n / (classes * n_pos).clamp(min=1.0)
                w_neg = n / (classes * n_neg).clamp(min=1.0)
                w = w * torch.where(y > 0.5, w_pos, w_neg)
            bce = (w * per).sum() / n.clamp(min=1.0)
            return self.bce_weight * bce + pull

    def forward(
        self,
        output: DAMMOutput,
        noise: torch.Tensor,
        divergence_aware: bool,
        weights: torch.Tensor | None = None,
        label_losses: tuple[torch.Tensor, torch.Tensor] | None = None,
        calibration: bool = False,
        mismatch: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Compute the loss.

        Args:
            output: the denoiser's :class:`~damm.networks.denoiser.DAMMOutput`.
            noise: the regression target, shape of ``output.eps_uni``: the true noise ``eps`` (the paper), or
                the velocity under v-prediction (:func:`diffusion_target`).
            divergence_aware: False for the warm-up phase, True afterwards.
            weights: optional per-sample weights ``[B]`` of both branch losses (e.g. :func:`min_snr_weights`);
                the label ``y`` compares the two branches of one sample, so it does not change. ``None``: the
                paper's unweighted loss, exactly.
            label_losses: the branch errors at further timesteps, ``[B, M]`` each (see :meth:`gate_label`).
            calibration: the calibration phase: the loss is the (unweighted) confidence term alone.
            mismatch: ``[B]`` bool, samples with mismatched auxiliary latents (``gate_training="correspondence"``):
                label 0, and their denoising term is the uni-modal error alone.

        Returns:
            ``(loss, logs)``, ``loss`` fp32 (also under autocast); ``logs`` has ``loss``, ``loss_uni``, ``loss_multi``,
            ``confidence_mean``, ``label_rate`` (fraction with ``l_multi <= l_uni``), ``gated_multi_fraction``
            (fraction with ``c >= gamma``), ``loss_confidence`` (the unweighted confidence term; computed but not used
            in the warm-up phase), ``label_given_fraction`` (share of samples with a label).

        Raises:
            ValueError: if ``noise`` does not match the predictions' shape.
        """
        if noise.shape != output.eps_uni.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} does not match the prediction shape {tuple(output.eps_uni.shape)}"
            )
        with fp32(noise.device):
            l_uni, l_multi = branch_errors(output, noise, weights)
            c = upcast(output.confidence)
            label, mask = self.gate_label(l_uni, l_multi, label_losses, mismatch)
            self.last_label, self.last_label_mask = label, mask
            to_multi = (c >= self.gamma).detach()
            loss_conf = self.confidence_loss(c, label, mask)
            if calibration:
                loss = loss_conf
            elif divergence_aware:
                both = 0.5 * (l_uni + l_multi)
                per_sample = both if self.gate_branch_loss == "both" else torch.where(to_multi, both, l_uni)
                if mismatch is not None:
                    per_sample = torch.where(mismatch.to(l_uni.device).bool(), l_uni, per_sample)
                loss = per_sample.mean() + self.alpha * loss_conf
            else:
                loss = 0.5 * (l_uni.mean() + l_multi.mean())
        logs = {
            "loss": float(loss.detach()),
            "loss_uni": float(l_uni.detach().mean()),
            "loss_multi": float(l_multi.detach().mean()),
            "confidence_mean": float(c.detach().float().mean()),
            "label_rate": float(label.mean()),
            "gated_multi_fraction": float(to_multi.float().mean()),
            "loss_confidence": float(loss_conf.detach()),
            "label_given_fraction": 1.0 if mask is None else float(mask.float().mean()),
        }
        return loss, logs


def mismatch_auxiliary(
    conditions: list[torch.Tensor], fraction: float, generator: torch.Generator | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Replace the auxiliary latents of a random share of the batch by ones that do not belong to the sample.

    Each chosen sample gets one kind of :data:`MISMATCH_KINDS`, drawn uniformly: ``swap`` (another sample's
    auxiliary latents, when the batch has more than one sample; otherwise ``shift``), ``shift`` (rolled over every
    spatial axis by 1/4 to 3/4 of its length) or ``flip`` (every spatial axis reversed). The anchor (``conditions[0]``)
    is never changed; all auxiliary modalities of a sample are mismatched together.

    Args:
        conditions: ``[z_anchor, z_aux_1, ...]``, each ``[B, C, *spatial]``.
        fraction: probability that a sample is mismatched, in ``[0, 1)``.
        generator: random generator on the latents' device (``None``: torch's global one).

    Returns:
        ``(conditions, mismatch)``: the new list (unchanged tensors where nothing changed) and ``[B]`` bool.

    Raises:
        ValueError: ``fraction`` outside ``[0, 1)`` or fewer than two conditions.
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"gate_mismatch_fraction must be in [0, 1), got {fraction}")
    if len(conditions) < 2:
        raise ValueError("mismatch_auxiliary needs an anchor and at least one auxiliary condition")
    anchor = conditions[0]
    b, device = anchor.shape[0], anchor.device
    mismatch = torch.rand(b, generator=generator, device=device) < float(fraction)
    if not bool(mismatch.any()):
        return list(conditions), mismatch
    kinds = torch.randint(0, len(MISMATCH_KINDS), (b,), generator=generator, device=device)
    partner = (
        torch.arange(b, device=device) + torch.randint(1, max(b, 2), (b,), generator=generator, device=device)
    ) % b
    spatial = list(anchor.shape[2:])
    shifts = [
        int(torch.randint(max(1, n // 4), max(2, 3 * n // 4 + 1), (1,), generator=generator, device=device))
        for n in spatial
    ]
    dims = tuple(range(1, 1 + len(spatial)))
    out = [anchor]
    for aux in conditions[1:]:
        new = aux.clone()
        for i in torch.nonzero(mismatch).flatten().tolist():
            kind = MISMATCH_KINDS[int(kinds[i])]
            if kind == "swap" and b == 1:
                kind = "shift"
            if kind == "swap":
                new[i] = aux[int(partner[i])]
            elif kind == "shift":
                new[i] = torch.roll(aux[i], shifts=shifts, dims=dims)
            else:
                new[i] = torch.flip(aux[i], dims=dims)
        out.append(new)
    return out, mismatch


def diffusion_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the denoiser regresses under the scheduler's ``prediction_type``.

    Args:
        scheduler: the training scheduler (MONAI ``DDPMScheduler``; ``prediction_type`` ``"epsilon"``, the paper,
            or ``"v_prediction"``, ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0``).
        latents: clean latents ``z_0``.
        noise: ``eps``.
        timesteps: ``[B]``.

    Returns:
        ``eps`` or ``v``.

    Raises:
        ValueError: another prediction type (``"sample"`` is not supported by the DAMM branches' gating).
    """
    kind = getattr(scheduler, "prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {kind!r}")


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., ICCV 2023) per sample.

    ``SNR_t = abar_t / (1 - abar_t)``; weight ``min(SNR_t, gamma) / SNR_t`` for epsilon prediction and
    ``min(SNR_t, gamma) / (SNR_t + 1)`` for v-prediction, so that high-SNR (nearly clean) steps no longer dominate.

    Args:
        scheduler: the training scheduler (its ``alphas_cumprod`` and ``prediction_type``).
        timesteps: ``[B]`` integer steps.
        gamma: the clamp (the paper's 5); must be > 0.

    Returns:
        ``[B]`` float32 weights.

    Raises:
        ValueError: ``gamma <= 0``.
    """
    if not float(gamma) > 0:
        raise ValueError(f"dm_min_snr_gamma must be > 0 to weight the loss (0 disables it), got {gamma}")
    abar = scheduler.alphas_cumprod.to(timesteps.device, torch.float64)[timesteps.long()]
    snr = abar / (1.0 - abar)
    clamped = snr.clamp(max=float(gamma))
    denom = snr + 1.0 if getattr(scheduler, "prediction_type", "epsilon") == "v_prediction" else snr
    return (clamped / denom).float()


def per_sample_reference_loss(
    model: DAMMDenoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    loss_fn: DAMMLoss,
    divergence_aware: bool = True,
) -> torch.Tensor:
    """The official micro-batch procedure: one forward per sample (batch 1), Python branching per sample.

    For reference and benchmarking only; :class:`DAMMLoss` on a batched ``forward_all`` gives the same value
    and gradients with GroupNorm (not with BatchNorm in training mode).

    Args:
        model: the denoiser.
        x: ``cat([x_t, z_anchor, z_aux...], dim=1)`` for the batch.
        timesteps: ``[B]``.
        noise: the true noise ``[B, C_lat, *spatial]``.
        loss_fn: supplies ``gamma``, ``alpha`` and the confidence weights.
        divergence_aware: False for the warm-up phase.

    Returns:
        The scalar loss (differentiable).
    """
    t = model._check_inputs(x, timesteps)
    terms, confidences, labels = [], [], []
    for i in range(x.shape[0]):
        out = model.forward_all(x[i : i + 1], t[i : i + 1], use_uncertainty=divergence_aware)
        l_uni = (out.eps_uni - noise[i : i + 1]).abs().mean()
        l_multi = (out.eps_multi - noise[i : i + 1]).abs().mean()
        if not divergence_aware:
            terms.append(0.5 * (l_uni + l_multi))
            continue
        c = out.confidence.reshape(())
        confidences.append(c)
        labels.append(1.0 if float(l_multi.detach()) <= float(l_uni.detach()) else 0.0)
        terms.append(l_uni if float(c.detach()) < loss_fn.gamma else 0.5 * (l_uni + l_multi))
    loss = torch.stack(terms).mean()
    if divergence_aware:
        c_all = torch.stack(confidences)
        loss = loss + loss_fn.alpha * loss_fn.confidence_loss(c_all, torch.tensor(labels, device=c_all.device))
    return loss

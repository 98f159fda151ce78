"""DRDM sampling (spec drdm.md §3): Algorithm 2 (deform-then-recover), 3 (augmentation), 4 (registration pairs).

Algorithm 2 draws a random cumulative field ``Ψ_{T'}``, sets ``φ = Ψ_{T'}`` and runs the deterministic recovery
loop ``û_t = D_θ(I_0∘(id + φ), t)``, ``φ ← φ ⊕ û_t`` (apply ``û_t`` first, then ``φ``), re-warping the
**original** image at every step so interpolation blur never accumulates. The result is a moderate, smooth
deformation ``φ`` of the input. Labels are warped label-safely (nearest neighbour, or one-hot + linear +
argmax), so the output label set is a subset of the input's. A folding guard redraws outputs whose folding
fraction exceeds a threshold, a bounded number of times, and reports when it cannot be met.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from drdm.diffusion import DeformationDiffusion
from drdm.fields import compose, folding_fraction, warp

__all__ = [
    "DRDMSampler",
    "RegistrationTriplet",
    "SampleResult",
    "check_labels",
    "warp_labels",
]

logger = logging.getLogger(__name__)


class SampleResult(NamedTuple):
    """Output of :meth:`DRDMSampler.sample` (batch ``B``).

    Attributes:
        ddf: recovered deformation ``φ`` ``[B, d, *S]`` (voxels; pull-back: ``out(x) = in(x + φ(x))``).
        image: the input image warped by ``φ``.
        labels: the input labels warped label-safely by ``φ`` (``None`` without labels).
        random_ddf: the random starting field ``Ψ_{T'}``.
        t_prime: the start level.
        folding_fraction: ``[B]`` fraction of voxels with ``det(I + ∇φ) <= 0``.
        attempts: ``[B]`` draws used by the folding guard.
        accepted: ``[B]`` whether the folding threshold was met (always True without a threshold).
    """

    ddf: torch.Tensor
    image: torch.Tensor
    labels: torch.Tensor | None
    random_ddf: torch.Tensor
    t_prime: int
    folding_fraction: torch.Tensor
    attempts: torch.Tensor
    accepted: torch.Tensor


class RegistrationTriplet(NamedTuple):
    """Output of :meth:`DRDMSampler.registration_pair` (Algorithm 4).

    Attributes:
        moving: ``φ_aug(I_0)``.
        fixed: ``φ_syn ∘ φ_aug (I_0)``; ``fixed ≈ warp(moving, ddf)``.
        ddf: ground-truth field ``φ_syn`` (voxels, MONAI ``Warp`` convention) mapping moving onto fixed.
        source_to_fixed: ``φ_aug ⊕ φ_syn``, the field that warps ``I_0`` onto fixed in one interpolation.
        moving_labels: labels of the moving image (or ``None``).
        fixed_labels: labels of the fixed image (or ``None``).
        moving_result: the Algorithm-2 result that produced the moving image.
        fixed_result: the Algorithm-2 result that produced ``φ_syn``.
    """

    moving: torch.Tensor
    fixed: torch.Tensor
    ddf: torch.Tensor
    source_to_fixed: torch.Tensor
    moving_labels: torch.Tensor | None
    fixed_labels: torch.Tensor | None
    moving_result: SampleResult
    fixed_result: SampleResult


def check_labels(labels: torch.Tensor, image: torch.Tensor, name: str = "labels") -> None:
    """Check a label map against its image.

    Args:
        labels: ``[B, 1, *S]`` integer-valued label map.
        image: ``[B, C, *S]`` image.
        name: name used in messages.

    Raises:
        ValueError: spatial shape or batch differs from the image, more than one channel, or non-integer values.
    """
    if labels.ndim != image.ndim or labels.shape[0] != image.shape[0] or labels.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"{name}: shape {tuple(labels.shape)} does not match the image {tuple(image.shape)} "
            "(labels must be [B, 1, *S] on the image grid)."
        )
    if labels.shape[1] != 1:
        raise ValueError(f"{name}: expected one channel of integer labels, got {labels.shape[1]} channels.")
    if labels.is_floating_point() and bool((labels != labels.round()).any()):
        bad = labels[labels != labels.round()].flatten()[:3].tolist()
        raise ValueError(f"{name}: label maps must hold integer values, found e.g. {bad}.")


def warp_labels(
    labels: torch.Tensor, ddf: torch.Tensor, mode: str = "nearest", padding_mode: str = "border"
) -> torch.Tensor:
    """Warp an integer label map so the output label set is a subset of the input's.

    Args:
        labels: ``[B, 1, *S]`` integer-valued.
        ddf: ``[B, d, *S]`` voxels.
        mode: ``"nearest"`` or ``"onehot"`` (one-hot, linear interpolation per class, argmax; smoother edges).
        padding_mode: ``"border"`` (default; outside values are copies of edge labels, so no new label can
            appear) or ``"zeros"`` (with nearest: outside becomes 0).

    Returns:
        Warped labels with the input's dtype.
    """
    if mode == "nearest":
        out = warp(labels.float(), ddf, "nearest", padding_mode).round()
        return out.to(labels.dtype)
    if mode != "onehot":
        raise ValueError(f"label mode must be 'nearest' or 'onehot', got {mode!r} (never bicubic for labels).")
    values, inverse = torch.unique(labels, return_inverse=True)
    onehot = torch.zeros((labels.shape[0], values.numel(), *labels.shape[2:]), dtype=ddf.dtype, device=ddf.device)
    onehot.scatter_(1, inverse.to(ddf.device).long(), 1.0)
    warped = warp(onehot, ddf, "bilinear", padding_mode)
    return values.to(ddf.device)[warped.argmax(1, keepdim=True)].to(labels.dtype)


class DRDMSampler:
    """Algorithms 2-4 of DRDM with a trained recovery network.

    Args:
        network: recovery network ``D_θ(x, t) -> û`` (e.g. :class:`drdm.networks.RecoveryNet`).
        diffusion: the forward process used in training.
        start: ``"t_prime"`` (Algorithm 2: recovery steps ``min(T', T-1), …, 1``) or ``"all"`` (the official code:
            steps ``T-1, …, 0`` whatever ``T'``).
        folding_threshold: reject outputs whose folding fraction exceeds this (default 0.01 = 1 %);
            ``None`` disables the guard.
        max_retries: redraws per output when the guard rejects it.
        on_failure: ``"warn"`` (keep the least-folded draw, flag it ``accepted=False``, log a warning) or
            ``"raise"`` (RuntimeError).
        label_mode: ``"nearest"`` or ``"onehot"`` (see :func:`warp_labels`).
        image_mode: interpolation of the image warp.
        image_padding_mode: padding of the image warp (zeros, as in training).
        label_padding_mode: padding of the label warp.
        field_padding_mode: padding of the field compositions.
    """

    def __init__(
        self,
        network: nn.Module,
        diffusion: DeformationDiffusion,
        start: str = "t_prime",
        folding_threshold: float | None = 0.01,
        max_retries: int = 3,
        on_failure: str = "warn",
        label_mode: str = "nearest",
        image_mode: str = "bilinear",
        image_padding_mode: str = "zeros",
        label_padding_mode: str = "border",
        field_padding_mode: str = "border",
    ) -> None:
        if start not in ("t_prime", "all"):
            raise ValueError(f"start must be 't_prime' (Algorithm 2) or 'all' (official), got {start!r}.")
        if on_failure not in ("warn", "raise"):
            raise ValueError(f"on_failure must be 'warn' or 'raise', got {on_failure!r}.")
        if label_mode not in ("nearest", "onehot"):
            raise ValueError(f"label_mode must be 'nearest' or 'onehot', got {label_mode!r}.")
        if folding_threshold is not None and not 0.0 <= folding_threshold <= 1.0:
            raise ValueError(f"folding_threshold is a fraction in [0, 1] (0.01 = 1 %), got {folding_threshold}.")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}.")
        self.network = network
        self.diffusion = diffusion
        self.start = start
        self.folding_threshold = folding_threshold
        self.max_retries = int(max_retries)
        self.on_failure = on_failure
        self.label_mode = label_mode
        self.image_mode = image_mode
        self.image_padding_mode = image_padding_mode
        self.label_padding_mode = label_padding_mode
        self.field_padding_mode = field_padding_mode

    # ------------------------------------------------------------------ validation
    def check_t_prime(self, t_prime: int) -> int:
        """Return ``t_prime`` as int after checking it lies in ``[1, T]``.

        Raises:
            ValueError: not an integer in ``[1, T]``.
        """
        t_max = self.diffusion.num_timesteps
        if isinstance(t_prime, bool) or int(t_prime) != t_prime or not 1 <= int(t_prime) <= t_max:
            raise ValueError(f"T' (start level) must be an integer in [1, {t_max}], got {t_prime!r}.")
        return int(t_prime)

    def recovery_levels(self, t_prime: int) -> list[int]:
        """Network levels visited by the recovery loop for start level ``t_prime``."""
        t_max = self.diffusion.num_timesteps
        if self.start == "all":
            return list(range(t_max - 1, -1, -1))
        return list(range(min(t_prime, t_max - 1), 0, -1))

    # ------------------------------------------------------------------ Algorithm 2
    @torch.no_grad()
    def recover(self, image: torch.Tensor, random_ddf: torch.Tensor, t_prime: int) -> torch.Tensor:
        """Deterministic recovery from ``φ = random_ddf``; returns the final ``φ``.

        Args:
            image: ``[B, C, *S]`` original image (network intensity scale).
            random_ddf: ``[B, d, *S]`` starting field ``Ψ_{T'}``.
            t_prime: start level.

        Returns:
            ``[B, d, *S]`` recovered field.
        """
        was_training = self.network.training
        self.network.eval()
        phi = random_ddf
        try:
            for level in self.recovery_levels(t_prime):
                current = warp(image, phi, self.image_mode, self.image_padding_mode)
                t = torch.full((image.shape[0],), level, dtype=torch.long, device=image.device)
                step = self.network(current, t)
                phi = compose(phi, step, self.field_padding_mode)
        finally:
            self.network.train(was_training)
        return phi

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        t_prime: int,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SampleResult:
        """Algorithm 2 with the folding guard.

        Args:
            image: ``[B, C, *S]`` image in the network's intensity scale.
            t_prime: start level in ``[1, T]``.
            labels: optional ``[B, 1, *S]`` integer label map.
            generator: random generator for reproducible draws.

        Returns:
            :class:`SampleResult`.

        Raises:
            ValueError: bad ``t_prime`` or labels.
            RuntimeError: ``on_failure="raise"`` and the folding threshold could not be met.
        """
        t_prime = self.check_t_prime(t_prime)
        if image.ndim not in (4, 5):
            raise ValueError(f"image must be [B, C, *S] with 2 or 3 spatial dims, got {tuple(image.shape)}.")
        if labels is not None:
            check_labels(labels, image)
        batch, shape = image.shape[0], image.shape[2:]
        best_ddf = best_rand = best_fold = None
        attempts = torch.zeros(batch, dtype=torch.long)
        todo = torch.arange(batch)
        for _ in range(self.max_retries + 1):
            _, rand = self.diffusion.sample_fields(
                shape, t_prime, len(todo), generator, image.device, image.dtype, with_step=False
            )
            ddf = self.recover(image[todo], rand, t_prime)
            fold = folding_fraction(ddf).cpu()
            attempts[todo] += 1
            if best_ddf is None:
                best_ddf, best_rand, best_fold = ddf, rand, fold
            else:
                better = fold < best_fold[todo]
                idx = todo[better]
                best_ddf[idx.to(image.device)] = ddf[better.to(image.device)]
                best_rand[idx.to(image.device)] = rand[better.to(image.device)]
                best_fold[idx] = fold[better]
            if self.folding_threshold is None:
                break
            todo = torch.nonzero(best_fold > self.folding_threshold).flatten()
            if todo.numel() == 0:
                break
        assert best_ddf is not None and best_rand is not None and best_fold is not None
        accepted = (
            torch.ones(batch, dtype=torch.bool)
            if self.folding_threshold is None
            else best_fold <= self.folding_threshold
        )
        if not bool(accepted.all()):
            msg = (
                f"DRDM folding guard: {int((~accepted).sum())} of {batch} output(s) at T'={t_prime} keep a folding "
                f"fraction of {[round(100 * f, 3) for f in best_fold[~accepted].tolist()]} % > threshold "
                f"{100 * self.folding_threshold:.3f} % after {self.max_retries + 1} draws; lower T' or raise "
                "folding_threshold / max_retries."
            )
            if self.on_failure == "raise":
                raise RuntimeError(msg)
            logger.warning(msg)
        warped = warp(image, best_ddf, self.image_mode, self.image_padding_mode)
        warped_labels = (
            None if labels is None else warp_labels(labels, best_ddf, self.label_mode, self.label_padding_mode)
        )
        return SampleResult(best_ddf, warped, warped_labels, best_rand, t_prime, best_fold, attempts, accepted)

    __call__ = sample

    # ------------------------------------------------------------------ Algorithms 3 and 4
    @torch.no_grad()
    def augment(
        self,
        image: torch.Tensor,
        t_primes: Sequence[int],
        outputs_per_level: int = 1,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[SampleResult]:
        """Algorithm 3: ``outputs_per_level`` deformed copies of ``(image, labels)`` for every level in ``t_primes``.

        Args:
            image: ``[B, C, *S]``.
            t_primes: start levels (each in ``[1, T]``; all checked before any work starts).
            outputs_per_level: outputs per level.
            labels: optional ``[B, 1, *S]`` labels.
            generator: random generator.

        Returns:
            ``len(t_primes) * outputs_per_level`` results, level-major.
        """
        levels = [self.check_t_prime(t) for t in t_primes]
        if outputs_per_level < 1:
            raise ValueError(f"outputs_per_level must be >= 1, got {outputs_per_level}.")
        if labels is not None:
            check_labels(labels, image)
        return [self.sample(image, t, labels, generator) for t in levels for _ in range(outputs_per_level)]

    @torch.no_grad()
    def registration_pair(
        self,
        image: torch.Tensor,
        t_aug: int,
        t_syn: int,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> RegistrationTriplet:
        """Algorithm 4: a (moving, fixed, ground-truth DDF) triplet from one image.

        ``φ_aug`` = Alg2(I_0, t_aug), moving = ``φ_aug(I_0)``; ``φ_syn`` = Alg2(moving, t_syn); fixed is ``I_0``
        warped once by ``φ_aug ∘ φ_syn`` (no double interpolation), so ``fixed ≈ warp(moving, φ_syn)``.

        Args:
            image: ``[B, C, *S]``.
            t_aug: start level of the moving image's deformation.
            t_syn: start level of the synthesised registration field.
            labels: optional labels.
            generator: random generator.

        Returns:
            :class:`RegistrationTriplet`.
        """
        t_aug, t_syn = self.check_t_prime(t_aug), self.check_t_prime(t_syn)
        if labels is not None:
            check_labels(labels, image)
        first = self.sample(image, t_aug, labels, generator)
        second = self.sample(first.image, t_syn, None, generator)
        total = compose(first.ddf, second.ddf, self.field_padding_mode)
        fixed = warp(image, total, self.image_mode, self.image_padding_mode)
        fixed_labels = None
        if labels is not None:
            fixed_labels = warp_labels(labels, total, self.label_mode, self.label_padding_mode)
        return RegistrationTriplet(first.image, fixed, second.ddf, total, first.labels, fixed_labels, first, second)

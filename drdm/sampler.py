"""DRDM sampling (spec drdm.md §3): Algorithm 2 (deform-then-recover), 3 (augmentation), 4 (registration pairs).

Algorithm 2 draws a random cumulative field ``Ψ_{T'}``, sets ``φ = Ψ_{T'}`` and runs the deterministic recovery
loop ``û_t = D_θ(I_0∘(id + φ), t)``, ``φ ← φ ⊕ û_t`` (apply ``û_t`` first, then ``φ``), re-warping the
**original** image at every step so interpolation blur never accumulates. The result is a moderate, smooth
deformation ``φ`` of the input. Labels are warped label-safely (nearest neighbour, or one-hot + linear +
argmax), so the output label set is a subset of the input's. A folding guard redraws outputs whose folding
fraction exceeds a threshold, a bounded number of times, and reports when it cannot be met.

Speed: outputs are recovered in batches (``batch_size`` rows, each with its own seeded generator, so results do
not depend on the batching), the network runs under the ``precision`` setting (bf16 autocast on CPU) while the
fields stay fp32, and :class:`drdm.networks.RecoveryNet` uses channels-last convolutions. ``recovery_stride`` > 1
trades fidelity for speed: the loop visits every ``s``-th level and applies each predicted step ``s`` times (a
flow power, like skipping steps in a DDIM sampler); this is an approximation not in the paper, 1 = Algorithm 2.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ddcore.device import module_device
from ddcore.precision import autocast, check_precision
from drdm.diffusion import DeformationDiffusion
from drdm.fields import compose, flow_power, folding_fraction, warp

__all__ = [
    "DRDMSampler",
    "RegistrationTriplet",
    "SampleResult",
    "check_labels",
    "warp_intensities",
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


def warp_intensities(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp an image in its original intensities; what comes from outside the image takes the image minimum.

    Zero padding of ``image - min`` (then adding the minimum back) makes the outside the background value of
    any intensity scale (CT -1024, MR 0), instead of 0 or a copy of the border.

    Args:
        image: ``[B, C, *S]``.
        ddf: ``[B, d, *S]`` voxels.
        mode: interpolation (``"bilinear"``, ``"bicubic"``, ``"nearest"``).

    Returns:
        The warped image, same shape and dtype as ``image`` (floating).
    """
    low = image.amin()
    return warp(image - low, ddf, mode, "zeros") + low


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

    Outputs are generated in batches: every output (a row) gets its own random generator, seeded from the
    ``generator`` passed to :meth:`sample` / :meth:`augment`, which draws its random start field (and the
    folding guard's redraws); the recovery then runs ``batch_size`` rows at a time. A row's result therefore
    depends only on its image, its seed and its start level, not on ``batch_size`` nor on the other rows (up to
    floating-point rounding of batched convolutions), and the same seed reproduces the same outputs.

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
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only): the autocast precision of the
            network's forward passes. Random fields, warps, compositions, Jacobians and every returned tensor stay
            fp32 (see :mod:`ddcore.precision`).
        batch_size: rows (outputs × input batch) recovered together; bounds memory (activations grow linearly).
        device: device the sampling runs on, used to validate ``precision`` at construction (default: the
            network's device); the device of the images is checked again at each call.
        recovery_stride: visit every ``s``-th recovery level and apply each predicted step ``s`` times
            (``flow_power``): about ``s`` times fewer network calls, an approximation of Algorithm 2 (default 1:
            every level, exactly Algorithm 2).
        compile_network: run the network's recovery calls through ``torch.compile`` (default False). Same fields
            up to float rounding; on CPU (inductor, needs a C++ compiler) a modest gain per network pass, but the
            first call of every new batch shape compiles for minutes, so it pays off only for long augmentation
            runs (eager vs compiled and the compile time: ``benchmarks/drdm_sampling.py``).

    Raises:
        ValueError: a bad setting (named in the message), before any work.
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
        precision: str = "fp32",
        batch_size: int = 4,
        device: str | torch.device | None = None,
        recovery_stride: int = 1,
        compile_network: bool = False,
    ) -> None:
        if not isinstance(compile_network, bool):
            raise ValueError(f"compile_network must be true or false, got {compile_network!r}.")
        if isinstance(recovery_stride, bool) or int(recovery_stride) != recovery_stride or recovery_stride < 1:
            raise ValueError(f"recovery_stride must be an integer >= 1, got {recovery_stride!r}.")
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
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or int(batch_size) < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        self.precision = check_precision(precision, device if device is not None else module_device(network))
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
        self.batch_size = int(batch_size)
        self.recovery_stride = int(recovery_stride)
        self.compile_network = compile_network
        self._compiled: nn.Module | None = None

    def _recovery_network(self) -> nn.Module:
        """The network as the recovery loop calls it: compiled once (lazily) when ``compile_network`` is set."""
        if not self.compile_network:
            return self.network
        if self._compiled is None:
            self._compiled = torch.compile(self.network)
        return self._compiled

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

    def _first_level(self, t_prime: int) -> int:
        """First network level of the recovery loop for start level ``t_prime``."""
        t_max = self.diffusion.num_timesteps
        return t_max - 1 if self.start == "all" else min(t_prime, t_max - 1)

    def recovery_levels(self, t_prime: int) -> list[int]:
        """Network levels visited by the recovery loop for start level ``t_prime``."""
        return list(range(self._first_level(t_prime), self._last_level - 1, -self.recovery_stride))

    @property
    def _last_level(self) -> int:
        return 0 if self.start == "all" else 1

    def _check_image(self, image: torch.Tensor, labels: torch.Tensor | None) -> None:
        if image.ndim not in (4, 5):
            raise ValueError(f"image must be [B, C, *S] with 2 or 3 spatial dims, got {tuple(image.shape)}.")
        if labels is not None:
            check_labels(labels, image)

    # ------------------------------------------------------------------ Algorithm 2
    @torch.no_grad()
    def recover(
        self, image: torch.Tensor, random_ddf: torch.Tensor, t_prime: int | Sequence[int] | torch.Tensor
    ) -> torch.Tensor:
        """Deterministic recovery from ``φ = random_ddf``; returns the final ``φ``.

        Rows with different start levels are recovered together: a row joins the loop at its first level.
        The network runs under the sampler's ``precision``; ``φ`` and its compositions stay fp32.

        Args:
            image: ``[B, C, *S]`` original image (network intensity scale).
            random_ddf: ``[B, d, *S]`` starting field ``Ψ_{T'}``.
            t_prime: start level, one for all rows or one per row.

        Returns:
            ``[B, d, *S]`` recovered field (float32 for fp16/bf16 inputs).
        """
        batch = image.shape[0]
        levels = torch.as_tensor(t_prime).reshape(-1).tolist()
        if len(levels) == 1:
            levels = levels * batch
        if len(levels) != batch:
            raise ValueError(f"recover: got {len(levels)} start levels for a batch of {batch}.")
        first = torch.tensor([self._first_level(int(t)) for t in levels])
        last, stride = self._last_level, self.recovery_stride
        if stride > 1 and bool((first != first.max()).any()):  # strided rows visit different levels: one group each
            out = random_ddf.float().clone()
            for level in first.unique().tolist():
                rows = torch.nonzero(first == level).flatten()
                dev = rows.to(image.device)
                out[dev] = self.recover(image[dev], random_ddf[dev], [levels[i] for i in rows.tolist()])
            return out
        was_training = self.network.training
        self.network.eval()
        network = self._recovery_network()
        phi = random_ddf.float() if random_ddf.dtype in (torch.float16, torch.bfloat16) else random_ddf
        if bool((first != first.max()).any()):
            phi = phi.clone()  # rows join at different levels: updated in place below, never the caller's tensor
        try:
            with autocast(self.precision, image.device):
                for level in range(int(first.max()) if batch else last - 1, last - 1, -stride):
                    active = first >= level
                    rows = None if bool(active.all()) else torch.nonzero(active).flatten().to(image.device)
                    x = image if rows is None else image[rows]
                    current_phi = phi if rows is None else phi[rows]
                    current = warp(x, current_phi, self.image_mode, self.image_padding_mode)
                    t = torch.full((x.shape[0],), level, dtype=torch.long, device=image.device)
                    step = network(current, t).float()
                    if stride > 1 and min(stride, level - last + 1) > 1:  # stands for this level and the skipped ones
                        step = flow_power(step, min(stride, level - last + 1), self.field_padding_mode)
                    updated = compose(current_phi, step, self.field_padding_mode)
                    if rows is None:
                        phi = updated
                    else:
                        phi[rows] = updated
        finally:
            self.network.train(was_training)
        return phi

    def _draw(
        self,
        shape: Sequence[int],
        levels: list[int],
        generators: list[torch.Generator],
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """One random start field ``Ψ_{T'}`` per row, each from the row's own generator."""
        fields = [
            self.diffusion.sample_fields(shape, t, 1, g, device, dtype, with_step=False)[1]
            for t, g in zip(levels, generators)
        ]
        return torch.cat(fields)

    def _guarded_chunk(
        self, image: torch.Tensor, levels: list[int], generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw, recover and apply the folding guard to one chunk of rows (redraws batched too)."""
        batch, shape = image.shape[0], image.shape[2:]
        dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
        best_ddf = best_rand = best_fold = None
        attempts = torch.zeros(batch, dtype=torch.long)
        todo = torch.arange(batch)
        for _ in range(self.max_retries + 1):
            rows = todo.tolist()
            rand = self._draw(shape, [levels[i] for i in rows], [generators[i] for i in rows], image.device, dtype)
            dev_rows = todo.to(image.device)
            ddf = self.recover(image[dev_rows], rand, [levels[i] for i in rows])
            fold = folding_fraction(ddf).cpu()
            attempts[todo] += 1
            if best_ddf is None:
                best_ddf, best_rand, best_fold = ddf, rand, fold
            else:
                better = fold < best_fold[todo]
                idx = todo[better].to(image.device)
                best_ddf[idx] = ddf[better.to(image.device)]
                best_rand[idx] = rand[better.to(image.device)]
                best_fold[todo[better]] = fold[better]
            if self.folding_threshold is None:
                break
            todo = torch.nonzero(best_fold > self.folding_threshold).flatten()
            if todo.numel() == 0:
                break
        assert best_ddf is not None and best_rand is not None and best_fold is not None
        if self.folding_threshold is None:
            accepted = torch.ones(batch, dtype=torch.bool)
        else:
            accepted = best_fold <= self.folding_threshold
        return best_ddf, best_rand, best_fold, attempts, accepted

    def _guard_message(self, levels: list[int], folds: list[float], total: int) -> str:
        assert self.folding_threshold is not None
        return (
            f"DRDM folding guard: {len(folds)} of {total} output(s) at T'={sorted(set(levels))} keep a folding "
            f"fraction of {[round(100 * f, 3) for f in folds]} % > threshold {100 * self.folding_threshold:.3f} % "
            f"after {self.max_retries + 1} draws; lower T' or raise folding_threshold / max_retries."
        )

    def _run_rows(
        self,
        image: torch.Tensor,
        sources: list[int],
        levels: list[int],
        labels: torch.Tensor | None,
        seeds: list[int],
    ) -> dict[str, torch.Tensor | None]:
        """Algorithm 2 for rows ``(image[sources[i]], levels[i], seeds[i])``, ``batch_size`` rows at a time."""
        # validate the precision on the images' device before any work
        check_precision(self.precision, image.device)
        parts: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("ddf", "image", "labels", "random_ddf", "fold", "attempts", "accepted")
        }
        failed: list[tuple[int, float]] = []
        for begin in range(0, len(sources), self.batch_size):
            end = min(begin + self.batch_size, len(sources))
            src = torch.as_tensor(sources[begin:end], device=image.device)
            chunk_levels = levels[begin:end]
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[begin:end]]
            x = image[src]
            ddf, rand, fold, attempts, accepted = self._guarded_chunk(x, chunk_levels, generators)
            bad = [(chunk_levels[i], float(fold[i])) for i in range(len(chunk_levels)) if not bool(accepted[i])]
            if bad and self.on_failure == "raise":
                raise RuntimeError(self._guard_message([b[0] for b in bad], [b[1] for b in bad], len(sources)))
            failed += bad
            parts["ddf"].append(ddf)
            parts["random_ddf"].append(rand)
            parts["image"].append(warp(x, ddf, self.image_mode, self.image_padding_mode))
            if labels is not None:
                parts["labels"].append(warp_labels(labels[src], ddf, self.label_mode, self.label_padding_mode))
            parts["fold"].append(fold)
            parts["attempts"].append(attempts)
            parts["accepted"].append(accepted)
        if failed:
            logger.warning(self._guard_message([b[0] for b in failed], [b[1] for b in failed], len(sources)))
        return {k: (torch.cat(v) if v else None) for k, v in parts.items()}

    @staticmethod
    def _seeds(count: int, generator: torch.Generator | None) -> list[int]:
        """Per-row seeds drawn from ``generator`` (the global torch RNG when ``None``)."""
        return torch.randint(0, 2**62, (count,), generator=generator).tolist()

    @staticmethod
    def _result(rows: dict[str, torch.Tensor | None], begin: int, end: int, t_prime: int) -> SampleResult:
        def part(key: str) -> torch.Tensor | None:
            value = rows[key]
            return None if value is None else value[begin:end]

        return SampleResult(
            part("ddf"),  # type: ignore[arg-type]
            part("image"),  # type: ignore[arg-type]
            part("labels"),
            part("random_ddf"),  # type: ignore[arg-type]
            t_prime,
            part("fold"),  # type: ignore[arg-type]
            part("attempts"),  # type: ignore[arg-type]
            part("accepted"),  # type: ignore[arg-type]
        )

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        t_prime: int,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SampleResult:
        """Algorithm 2 with the folding guard, for every image of the batch (``batch_size`` at a time).

        Args:
            image: ``[B, C, *S]`` image in the network's intensity scale.
            t_prime: start level in ``[1, T]``.
            labels: optional ``[B, 1, *S]`` integer label map.
            generator: random generator for reproducible draws (one seed per image is drawn from it).

        Returns:
            :class:`SampleResult`.

        Raises:
            ValueError: bad ``t_prime``, image, labels or precision for the image's device.
            RuntimeError: ``on_failure="raise"`` and the folding threshold could not be met.
        """
        t_prime = self.check_t_prime(t_prime)
        self._check_image(image, labels)
        batch = image.shape[0]
        rows = self._run_rows(image, list(range(batch)), [t_prime] * batch, labels, self._seeds(batch, generator))
        return self._result(rows, 0, batch, t_prime)

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

        All outputs are generated as one batch of rows (``len(t_primes) · outputs_per_level · B``), recovered
        ``batch_size`` rows at a time; rows of different levels share the loop (a row joins at its first level).

        Args:
            image: ``[B, C, *S]``.
            t_primes: start levels (each in ``[1, T]``; all checked before any work starts).
            outputs_per_level: outputs per level.
            labels: optional ``[B, 1, *S]`` labels.
            generator: random generator (one seed per output and image is drawn from it, level-major).

        Returns:
            ``len(t_primes) * outputs_per_level`` results (each for the whole input batch), level-major.
        """
        levels = [self.check_t_prime(t) for t in t_primes]
        if isinstance(outputs_per_level, bool) or int(outputs_per_level) != outputs_per_level or outputs_per_level < 1:
            raise ValueError(f"outputs_per_level must be an integer >= 1, got {outputs_per_level!r}.")
        self._check_image(image, labels)
        batch, count = image.shape[0], len(levels) * int(outputs_per_level)
        row_levels = [t for t in levels for _ in range(int(outputs_per_level)) for _ in range(batch)]
        sources = list(range(batch)) * count
        rows = self._run_rows(image, sources, row_levels, labels, self._seeds(count * batch, generator))
        return [self._result(rows, j * batch, (j + 1) * batch, row_levels[j * batch]) for j in range(count)]

    @torch.no_grad()
    def registration_pair(
        self,
        image: torch.Tensor,
        t_aug: int,
        t_syn: int,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> RegistrationTriplet:
        """Algorithm 4: a (moving, fixed, ground-truth DDF) triplet per image of the batch.

        ``φ_aug`` = Alg2(I_0, t_aug), moving = ``φ_aug(I_0)``; ``φ_syn`` = Alg2(moving, t_syn); fixed is ``I_0``
        warped once by ``φ_aug ∘ φ_syn`` (no double interpolation), so ``fixed ≈ warp(moving, φ_syn)``. Several
        triplets of one image: repeat it along the batch (each row draws its own fields; see :meth:`sample`).

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
        self._check_image(image, labels)
        first = self.sample(image, t_aug, labels, generator)
        second = self.sample(first.image, t_syn, None, generator)
        total = compose(first.ddf, second.ddf, self.field_padding_mode)
        fixed = warp(image, total, self.image_mode, self.image_padding_mode)
        fixed_labels = None
        if labels is not None:
            fixed_labels = warp_labels(labels, total, self.label_mode, self.label_padding_mode)
        return RegistrationTriplet(first.image, fixed, second.ddf, total, first.labels, fixed_labels, first, second)

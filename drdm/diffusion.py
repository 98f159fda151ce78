"""DRDM forward process ("deformation diffusion", spec drdm.md §1.2 and §1.4).

For a level ``t`` the process draws, per sample, a multi-scale Gaussian velocity ``v`` and a weak perturbation
``η`` on a control lattice that covers ``fov_factor`` times the image, integrates

- the cumulative field ``Ψ_t = (id + v')^{∘N(t)}`` with ``v' = v + η∘(id + v)`` (``η`` applied after ``v``), and
- the step field (training target) ``ψ_t = (id + v)^{∘n(t)}``,

then lifts both to image resolution (gain, bi/trilinear upsampling to the enlarged field of view, centre crop)
and deforms the image with ``Ψ_t``. All sizes are per axis, so non-square / non-cubic images are supported.

The whole process is an fp32 island (autocast disabled): calling it inside a bf16/fp16 autocast region returns
the same fp32 fields and image as outside (``benchmarks/drdm_forward.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ddcore.precision import fp32
from drdm.fields import (
    compose,
    flow_power,
    flow_power_sequential,
    resize_crop_field,
    sample_velocity,
    warp,
)

__all__ = [
    "DeformationDiffusion",
    "ForwardSample",
    "PowerSchedule",
    "official_cumulative_schedule",
    "official_step_schedule",
]


@dataclass(frozen=True)
class PowerSchedule:
    """Step-count schedule ``clip(floor(scale · t^power), min_steps, max_steps)``.

    Args:
        scale: multiplier.
        power: exponent.
        min_steps: lower clip.
        max_steps: upper clip (``None``: no upper clip).
    """

    scale: float
    power: float
    min_steps: int = 0
    max_steps: int | None = None

    def __call__(self, t: int | torch.Tensor) -> torch.Tensor:
        """Step counts for levels ``t`` (int or tensor), as a long tensor of the same shape."""
        tt = torch.as_tensor(t, dtype=torch.float64)
        # the small epsilon keeps exact integers (e.g. 32^0.6 = 8) from flooring down through rounding error
        n = torch.floor(self.scale * tt.clamp(min=0) ** self.power + 1e-9)
        n = n.clamp(min=self.min_steps) if self.max_steps is None else n.clamp(self.min_steps, self.max_steps)
        return n.long()


def official_cumulative_schedule() -> PowerSchedule:
    """Official cumulative schedule ``N(t) = clip(floor(2 t^1.3 / 3), 1, 200)``."""
    return PowerSchedule(scale=2.0 / 3.0, power=1.3, min_steps=1, max_steps=200)


def official_step_schedule() -> PowerSchedule:
    """Official step schedule ``n(t) = floor(t^0.6)``."""
    return PowerSchedule(scale=1.0, power=0.6, min_steps=0, max_steps=None)


class ForwardSample(NamedTuple):
    """Output of :meth:`DeformationDiffusion.q_sample`.

    Attributes:
        image: deformed image ``I_t = I_0∘(id + Ψ_t)``, ``[B, C, *S]``.
        step_field: ``ψ_t`` (training target; the network learns its inverse), ``[B, d, *S]`` voxels.
        cumulative_field: ``Ψ_t``, ``[B, d, *S]`` voxels.
        t: the levels used, ``[B]`` long.
    """

    image: torch.Tensor
    step_field: torch.Tensor
    cumulative_field: torch.Tensor
    t: torch.Tensor


class DeformationDiffusion:
    """The DRDM forward process with every constant of spec §1.2 as an argument.

    Args:
        num_timesteps: ``T`` (training levels ``0..T-1``; sampling may start at ``T``).
        control_size: lattice points along the longest image axis, or one size per axis. Other axes get
            ``round(control_size · S_a / max(S))`` points so the lattice spacing is (nearly) isotropic in voxels.
        levels: number of velocity scales (each coarser by 2, std doubled).
        sigma: finest-level velocity std in lattice voxels (official ``v_scale`` 4e-5 × 64 lattice = 2.56e-3).
        noise_ratio: std ratio of the perturbation ``η`` (official 0.08); 0 disables it.
        fov_factor: the lattice covers ``fov_factor`` × the image per axis (official ``crop_rate`` 2).
        gain: ``"geometric"`` (default: lattice voxels are converted to image voxels by the true lattice spacing),
            ``"official"`` (the released code's ``S/64`` gain, i.e. (S/C)² image voxels per lattice voxel: ×2
            too large for 2D 256², consistent for 3D 128³), or a float ``g`` (image-fraction gain, ``g·S/C``
            image voxels per lattice voxel; ``g = fov_factor`` is geometric).
        cumulative_schedule: ``N(t)`` callable (default :func:`official_cumulative_schedule`).
        step_schedule: ``n(t)`` callable (default :func:`official_step_schedule`).
        power_method: ``"binary"`` (O(log n) compositions) or ``"sequential"`` (the official O(n) loop).
        field_padding_mode: padding when composing fields (official: border).
        image_mode: interpolation of the image warp.
        image_padding_mode: padding of the image warp (official: zeros).
    """

    def __init__(
        self,
        num_timesteps: int = 80,
        control_size: int | Sequence[int] = 64,
        levels: int = 4,
        sigma: float = 2.56e-3,
        noise_ratio: float = 0.08,
        fov_factor: float = 2.0,
        gain: str | float = "geometric",
        cumulative_schedule: Callable[[torch.Tensor], torch.Tensor] | None = None,
        step_schedule: Callable[[torch.Tensor], torch.Tensor] | None = None,
        power_method: str = "binary",
        field_padding_mode: str = "border",
        image_mode: str = "bilinear",
        image_padding_mode: str = "zeros",
    ) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
        if fov_factor < 1.0:
            raise ValueError(f"fov_factor must be >= 1 (the lattice must cover the image), got {fov_factor}.")
        if power_method not in ("binary", "sequential"):
            raise ValueError(f"power_method must be 'binary' or 'sequential', got {power_method!r}.")
        if isinstance(gain, str) and gain not in ("geometric", "official"):
            raise ValueError(f"gain must be 'geometric', 'official' or a number, got {gain!r}.")
        self.num_timesteps = int(num_timesteps)
        self.control_size = control_size
        self.levels = int(levels)
        self.sigma = float(sigma)
        self.noise_ratio = float(noise_ratio)
        self.fov_factor = float(fov_factor)
        self.gain = gain
        self.cumulative_schedule = cumulative_schedule or official_cumulative_schedule()
        self.step_schedule = step_schedule or official_step_schedule()
        self.power_method = power_method
        self.field_padding_mode = field_padding_mode
        self.image_mode = image_mode
        self.image_padding_mode = image_padding_mode

    # ------------------------------------------------------------------ geometry
    def control_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Lattice size per axis for an image of ``spatial_shape``."""
        shape = tuple(int(s) for s in spatial_shape)
        if isinstance(self.control_size, int):
            longest = max(shape)
            return tuple(max(2, round(self.control_size * s / longest)) for s in shape)
        sizes = tuple(int(c) for c in self.control_size)
        if len(sizes) != len(shape):
            raise ValueError(f"control_size {sizes} does not match the {len(shape)}D image shape {shape}.")
        return sizes

    def enlarged_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Size per axis of the lattice's field of view at image resolution (``fov_factor`` × image)."""
        return tuple(max(int(s), round(self.fov_factor * int(s))) for s in spatial_shape)

    def lift_factors(self, spatial_shape: Sequence[int]) -> list[float]:
        """Image voxels per lattice voxel, per axis (the gain applied when lifting lattice fields)."""
        ctl = self.control_shape(spatial_shape)
        big = self.enlarged_shape(spatial_shape)
        if self.gain == "geometric":
            return [b / c for b, c in zip(big, ctl)]
        if self.gain == "official":
            return [(s / c) ** 2 for s, c in zip(spatial_shape, ctl)]
        return [float(self.gain) * s / c for s, c in zip(spatial_shape, ctl)]

    # ------------------------------------------------------------------ schedules
    def check_levels(self, t: int | torch.Tensor, batch: int, allow_t_max: bool = True) -> torch.Tensor:
        """Validate levels and broadcast them to a ``[batch]`` long tensor.

        Raises:
            ValueError: a level outside ``[0, T]`` (or ``[0, T-1]`` when ``allow_t_max`` is False).
        """
        tt = torch.as_tensor(t).reshape(-1)
        if tt.is_floating_point() and bool((tt != tt.round()).any()):
            raise ValueError(f"levels t must be integers, got {tt.tolist()}.")
        tt = tt.long()
        if tt.numel() == 1:
            tt = tt.expand(batch)
        if tt.numel() != batch:
            raise ValueError(f"got {tt.numel()} levels t for a batch of {batch}.")
        hi = self.num_timesteps if allow_t_max else self.num_timesteps - 1
        if bool(((tt < 0) | (tt > hi)).any()):
            raise ValueError(f"levels t must lie in [0, {hi}] (T = {self.num_timesteps}), got {tt.tolist()}.")
        return tt.clone()

    def step_counts(self, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N(t), n(t))`` as long tensors."""
        tt = torch.as_tensor(t)
        return (
            torch.as_tensor(self.cumulative_schedule(tt)).long(),
            torch.as_tensor(self.step_schedule(tt)).long(),
        )

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Training levels ``t ~ U{0, …, T-1}``, ``[batch]`` long."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator).to(device or "cpu")

    # ------------------------------------------------------------------ fields
    def _power(self, v: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        fn = flow_power if self.power_method == "binary" else flow_power_sequential
        return fn(v, n.to(v.device), padding_mode=self.field_padding_mode)

    def lift(self, field: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """Lattice field (lattice voxels) -> image-resolution field (image voxels): gain, upsample, centre crop."""
        d = field.shape[1]
        factors = torch.as_tensor(self.lift_factors(spatial_shape), dtype=field.dtype, device=field.device)
        scaled = field * factors.view(1, d, *([1] * d))
        return resize_crop_field(scaled, self.enlarged_shape(spatial_shape), tuple(spatial_shape))

    def sample_fields(
        self,
        spatial_shape: Sequence[int],
        t: int | torch.Tensor,
        batch: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        with_step: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Draw ``(ψ_t, Ψ_t)`` at image resolution.

        Args:
            spatial_shape: image size per axis (2 or 3 entries).
            t: level(s), int or ``[B]``; each in ``[0, T]``.
            batch: batch size (default: number of levels given).
            generator: random generator (on CPU) for reproducible draws.
            device: output device.
            dtype: output dtype.
            with_step: also integrate the step field ``ψ_t`` (sampling only needs ``Ψ_t``).

        Returns:
            ``(step_field or None, cumulative_field)``, each ``[B, d, *spatial_shape]`` in voxels.
        """
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"spatial_shape must have 2 or 3 entries, got {shape}.")
        if batch is None:
            batch = torch.as_tensor(t).numel()
        tt = self.check_levels(t, batch)
        big_n, small_n = self.step_counts(tt)
        ctl = self.control_shape(shape)
        with fp32(device):
            v = sample_velocity(batch, ctl, self.levels, self.sigma, generator, device, dtype)
            if self.noise_ratio > 0:
                eta = sample_velocity(batch, ctl, self.levels, self.sigma * self.noise_ratio, generator, device, dtype)
                v_traj = compose(eta, v, self.field_padding_mode)  # v first, then η
            else:
                v_traj = v
            cumulative = self.lift(self._power(v_traj, big_n), shape)
            step = self.lift(self._power(v, small_n), shape) if with_step else None
        return step, cumulative

    def q_sample(
        self, image: torch.Tensor, t: int | torch.Tensor, generator: torch.Generator | None = None
    ) -> ForwardSample:
        """Deform ``image`` to level ``t``: ``I_t = I_0∘(id + Ψ_t)``.

        Args:
            image: ``[B, C, *S]`` float image.
            t: level(s), int or ``[B]``, each in ``[0, T]``.
            generator: random generator for reproducible draws.

        Returns:
            :class:`ForwardSample` ``(image, step_field, cumulative_field, t)``.
        """
        if image.ndim not in (4, 5):
            raise ValueError(f"q_sample: image must be [B, C, *S] with 2 or 3 spatial dims, got {tuple(image.shape)}.")
        batch = image.shape[0]
        tt = self.check_levels(t, batch)
        dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
        step, cumulative = self.sample_fields(image.shape[2:], tt, batch, generator, image.device, dtype)
        with fp32(image.device):
            deformed = warp(image.to(dtype), cumulative, self.image_mode, self.image_padding_mode)
        assert step is not None
        return ForwardSample(deformed, step, cumulative, tt.to(image.device))

    def extra_repr(self) -> str:
        """Short description of the settings."""
        return (
            f"T={self.num_timesteps}, control_size={self.control_size}, levels={self.levels}, sigma={self.sigma}, "
            f"noise_ratio={self.noise_ratio}, fov_factor={self.fov_factor}, gain={self.gain}, "
            f"power_method={self.power_method}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

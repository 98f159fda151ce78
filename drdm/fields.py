"""Displacement-field algebra for DRDM: warping, composition, flow powers, random velocities, Jacobians.

Conventions (spec drdm.md §0):

- A field is a tensor ``[B, d, *S]`` in **voxel units**; channel ``i`` is the displacement along tensor axis ``i``
  (MONAI :class:`~monai.networks.blocks.Warp` convention, not x/y flipped). ``d`` is 2 or 3.
- Warping is a pull-back: ``warp(I, u)(x) = I(x + u(x))`` (``grid_sample`` with ``align_corners=True``).
- Composition ``compose(u, w) = w + u∘(id + w)`` is the displacement of ``T_u ∘ T_w`` (apply ``w`` first, then ``u``).
- ``flow_power(v, n)`` is ``(id + v)^{∘n}``: ``v`` composed with itself ``n`` times.

Precision: warping, composition and Jacobians are fp32 islands. They run with autocast disabled and upcast
fp16/bf16 inputs to fp32 (a bf16 sampling grid cannot even address pixel 257 exactly), so calling them inside a
``torch.autocast`` region (the DRDM sampler and trainer do) changes nothing. float64 inputs stay float64.

Every function accepts non-square / non-cubic shapes; nothing assumes a single edge length.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from ddcore.precision import fp32, upcast

__all__ = [
    "check_field",
    "compose",
    "field_to_physical",
    "flow_power",
    "flow_power_sequential",
    "folding_fraction",
    "grid_sample_all_threads",
    "invert_field",
    "jacobian_determinant",
    "linear_resize_matrix",
    "resize_crop_field",
    "sample_velocity",
    "warp",
]

_WARPERS: OrderedDict[tuple, Warp] = OrderedDict()
_MAX_WARPERS = 16


def grid_sample_all_threads(image: torch.Tensor, grid: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """``F.grid_sample`` that keeps every CPU thread busy when the batch is smaller than the thread count.

    PyTorch's CPU kernels (2D and 3D) parallelise over the batch only, so one image or volume runs on one core.
    Here each sample's output grid is cut into ``k = threads // batch`` slabs along its first axis (padded to a
    multiple of ``k``), the slabs are sampled as a batch of ``batch * k`` from the same (expanded, not copied for
    ``batch == 1``) input, and the slabs are put back together. Each output value is computed exactly as by one
    ``F.grid_sample`` call (same kernel, same grid point), so the result is bitwise identical. CUDA tensors and
    batches that already fill the threads go straight to ``F.grid_sample``.

    Args:
        image: ``[B, C, *S_in]``.
        grid: ``[B, *S_out, d]`` in ``grid_sample`` coordinates.
        **kwargs: ``mode``, ``padding_mode``, ``align_corners``, passed on.

    Returns:
        ``[B, C, *S_out]``.
    """
    batch = image.shape[0]
    slabs = torch.get_num_threads() // max(batch, 1)
    first = grid.shape[1]
    if image.device.type != "cpu" or slabs < 2 or first < 2:
        return F.grid_sample(image, grid, **kwargs)
    slabs = min(slabs, first)
    per = -(-first // slabs)
    pad = per * slabs - first
    if pad:  # repeat the last row of grid points; their samples are dropped below
        grid = torch.cat([grid, grid[:, -1:].expand(-1, pad, *grid.shape[2:])], dim=1)
    rest = grid.shape[2:]
    big_grid = grid.reshape(batch * slabs, per, *rest)
    big_image = image.unsqueeze(1).expand(batch, slabs, *image.shape[1:]).reshape(batch * slabs, *image.shape[1:])
    out = F.grid_sample(big_image, big_grid, **kwargs)  # [B*k, C, per, ...]
    channels = image.shape[1]
    out = out.reshape(batch, slabs, channels, per, *out.shape[3:]).transpose(1, 2)
    out = out.reshape(batch, channels, slabs * per, *out.shape[4:])
    return out[:, :, :first] if pad else out


class _CachedWarp(Warp):
    """:class:`monai.networks.blocks.Warp` whose reference grid is cached and whose CPU sampling uses every thread.

    MONAI 1.6.1 compares ``ref_grid.shape[1:]`` (``(d, *S)``) with ``ddf.shape[2:]`` (``S``), which never match, so
    it rebuilds (``arange`` + ``meshgrid`` + two ``stack`` + a copy) the identity grid at every call; this keeps
    the grid while the field's shape, dtype and device stay the same. The native path (MONAI's C++ extension is
    not built here) is MONAI's, with the identity grid kept already normalised to ``[-1, 1]`` in ``grid_sample``'s
    axis order (so each call is one scaled add instead of a per-axis normalisation and a reordering copy), and
    sampling by :func:`grid_sample_all_threads`.
    """

    _identity: torch.Tensor | None = None

    def get_reference_grid(self, ddf: torch.Tensor, jitter: bool = False, seed: int = 0) -> torch.Tensor:
        """The identity grid ``[B, d, *S]`` for ``ddf`` (cached)."""
        ref = self.ref_grid
        if ref is not None and ref.shape == ddf.shape and ref.dtype == ddf.dtype and ref.device == ddf.device:
            return ref
        self.ref_grid = None
        return super().get_reference_grid(ddf, jitter, seed)

    def _identity_grid(self, ddf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity grid ``[1, *S, d]`` in voxels (last axis in ``grid_sample`` order x, y[, z]) and the divisors."""
        shape = tuple(ddf.shape[2:])
        ref = self._identity
        if ref is None or tuple(ref.shape[1:-1]) != shape or ref.dtype != ddf.dtype or ref.device != ddf.device:
            axes = [torch.arange(s, dtype=ddf.dtype, device=ddf.device) for s in shape]
            ref = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1).unsqueeze(0)
            self._identity = ref
        divisors = torch.tensor([max(s - 1, 1) for s in shape[::-1]], dtype=ddf.dtype, device=ddf.device)
        return ref, divisors

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """Pull ``image`` through ``ddf`` (see :class:`~monai.networks.blocks.Warp`)."""
        if (
            self.jitter
            or image.ndim not in (4, 5)
            or tuple(ddf.shape) != (image.shape[0], image.ndim - 2, *image.shape[2:])
        ):
            return super().forward(image, ddf)  # MONAI's checks and messages
        ref, divisors = self._identity_grid(ddf)
        grid = ref + ddf.movedim(1, -1).flip(-1)  # channels z, y, x -> grid_sample's x, y, z
        grid.mul_(2).div_(divisors).sub_(1)  # voxels -> [-1, 1], the same operations as MONAI's
        return grid_sample_all_threads(
            image, grid, mode=self._interp_mode_native, padding_mode=self._padding_mode_native, align_corners=True
        )


def _warper(mode: str, padding_mode: str, ddf: torch.Tensor) -> Warp:
    """A :class:`monai.networks.blocks.Warp` for ``(mode, padding_mode)`` and the field's device, dtype and shape.

    ``Warp`` caches one reference grid (in the dtype of the first field it sees); keeping one instance per
    (dtype, batch, shape) in a small LRU avoids rebuilding the grid when the lattice and the image grid alternate
    (the sampler's loop does that at every step) and never reuses a grid of another dtype.
    """
    key = (mode, padding_mode, str(ddf.device), ddf.dtype, tuple(ddf.shape))
    if key in _WARPERS:
        _WARPERS.move_to_end(key)
        return _WARPERS[key]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*native grid_sample.*")
        _WARPERS[key] = _CachedWarp(mode=mode, padding_mode=padding_mode)
    if len(_WARPERS) > _MAX_WARPERS:
        _WARPERS.popitem(last=False)
    return _WARPERS[key]


def check_field(field: torch.Tensor, name: str = "field", spatial_shape: Sequence[int] | None = None) -> int:
    """Check that ``field`` is a displacement field ``[B, d, *S]`` with ``d`` = number of spatial dims.

    Args:
        field: tensor to check.
        name: name used in the error message.
        spatial_shape: when given, the required spatial shape ``S``.

    Returns:
        The number of spatial dims ``d``.

    Raises:
        ValueError: wrong rank, wrong number of components or wrong spatial shape.
    """
    if not isinstance(field, torch.Tensor) or field.ndim not in (4, 5):
        shape = tuple(field.shape) if isinstance(field, torch.Tensor) else type(field).__name__
        raise ValueError(f"{name}: expected a displacement field [B, d, *S] with d = 2 or 3, got {shape}.")
    d = field.ndim - 2
    if field.shape[1] != d:
        raise ValueError(
            f"{name}: a {d}D field needs {d} components (channel i = displacement along axis i), "
            f"got {field.shape[1]} components in shape {tuple(field.shape)}."
        )
    if spatial_shape is not None and tuple(field.shape[2:]) != tuple(spatial_shape):
        raise ValueError(f"{name}: spatial shape {tuple(field.shape[2:])} differs from {tuple(spatial_shape)}.")
    return d


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Pull-back warp ``image(x + ddf(x))`` with :class:`monai.networks.blocks.Warp`.

    Args:
        image: ``[B, C, *S]``.
        ddf: voxel-unit displacement ``[B, d, *S]``.
        mode: ``"bilinear"`` (trilinear in 3D), ``"nearest"`` or ``"bicubic"`` (2D only).
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.

    Returns:
        The warped image ``[B, C, *S]`` (float32 for fp16/bf16 inputs: an fp32 island).
    """
    check_field(ddf, "ddf", image.shape[2:])
    if image.shape[0] != ddf.shape[0]:
        raise ValueError(f"warp: batch of image ({image.shape[0]}) and ddf ({ddf.shape[0]}) differ.")
    image, ddf = upcast(image), upcast(ddf)
    with fp32(ddf.device):
        return _warper(mode, padding_mode, ddf)(image, ddf.to(image.dtype) if image.is_floating_point() else ddf)


def compose(u: torch.Tensor, w: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Displacement of ``T_u ∘ T_w`` (apply ``w`` first, then ``u``): ``w + u∘(id + w)``.

    Args:
        u: field applied second, ``[B, d, *S]``.
        w: field applied first, same shape.
        padding_mode: padding used when resampling ``u`` (``"border"`` extends the field outside the grid).

    Returns:
        The composed field, same shape (float32 for fp16/bf16 inputs).
    """
    check_field(u, "u")
    check_field(w, "w", u.shape[2:])
    u, w = upcast(u), upcast(w)
    with fp32(w.device):
        return w + warp(u, w, mode="bilinear", padding_mode=padding_mode)


def invert_field(u: torch.Tensor, iterations: int = 20, padding_mode: str = "border") -> torch.Tensor:
    """Inverse displacement of ``x -> x + u(x)`` by fixed-point iteration ``v ← -u∘(id + v)``, from ``v = -u``.

    ``warp(warp(I, u), v) ≈ I`` where the forward map did not pull from outside the grid. The residual
    ``compose(u, v) = v + u∘(id + v)`` contracts by about ``max|∇u|`` per iteration (it converges when the
    map is invertible and ``|∇u| < 1``), so smooth, fold-free fields converge in a few iterations; what is left is
    the bilinear interpolation error of ``u``. Check it with ``compose(u, invert_field(u)).abs().max()``.

    Args:
        u: ``[B, d, *S]`` voxel-unit field.
        iterations: fixed-point iterations (each one bilinear resampling of ``u``).
        padding_mode: padding of ``u`` outside the grid.

    Returns:
        ``v`` with the shape of ``u`` (float32 for fp16/bf16 inputs).
    """
    check_field(u, "u")
    if iterations < 0:
        raise ValueError(f"invert_field: iterations must be >= 0, got {iterations}.")
    u = upcast(u)
    with fp32(u.device):
        v = -u
        for _ in range(int(iterations)):
            v = -warp(u, v, mode="bilinear", padding_mode=padding_mode)
    return v


def _as_counts(n: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    counts = torch.as_tensor(n, dtype=torch.long, device=device).reshape(-1)
    if counts.numel() == 1:
        counts = counts.expand(batch)
    if counts.numel() != batch:
        raise ValueError(f"flow_power: got {counts.numel()} step counts for a batch of {batch}.")
    if bool((counts < 0).any()):
        raise ValueError(f"flow_power: step counts must be >= 0, got {counts.tolist()}.")
    return counts


def _masked_compose(u: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """``compose(u, w)`` for samples where ``mask`` is set, ``u`` unchanged elsewhere (no wasted work)."""
    if bool(mask.all()):
        return compose(u, w, padding_mode)
    if not bool(mask.any()):
        return u
    out = u.clone()
    out[mask] = compose(u[mask], w[mask], padding_mode)
    return out


def flow_power(v: torch.Tensor, n: int | torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """``(id + v)^{∘n}`` by binary exponentiation: ``O(log2 n)`` compositions, per-sample ``n``.

    Powers of the same map commute, so the result accumulates ``(id+v)^{∘2^k}`` for the set bits of ``n``.
    Equals :func:`flow_power_sequential` up to interpolation error.

    Args:
        v: small step field ``[B, d, *S]``.
        n: number of compositions, an int or a ``[B]`` tensor (0 gives the zero field).
        padding_mode: field padding for the compositions.

    Returns:
        The field ``[B, d, *S]``.
    """
    check_field(v, "v")
    counts = _as_counts(n, v.shape[0], v.device)
    result = torch.zeros_like(v)
    started = torch.zeros_like(counts, dtype=torch.bool)  # samples whose result is no longer the zero field
    power = v
    remaining = counts.clone()
    while True:
        bit = (remaining & 1).bool()
        first = bit & ~started
        if bool(first.any()):  # 0 ⊕ p = p: copy instead of composing with the zero field
            result = torch.where(first.view(-1, *([1] * (v.ndim - 1))), power, result)
        result = _masked_compose(result, power, bit & started, padding_mode)
        started = started | bit
        remaining = remaining >> 1
        active = remaining > 0
        if not bool(active.any()):
            break
        power = _masked_compose(power, power, active, padding_mode)
    return result


def flow_power_sequential(v: torch.Tensor, n: int | torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Reference ``(id + v)^{∘n}`` by the official loop ``φ ← v + φ∘(id + v)``, ``max(n)`` compositions.

    Args:
        v: small step field ``[B, d, *S]``.
        n: number of compositions, an int or a ``[B]`` tensor.
        padding_mode: field padding for the compositions.

    Returns:
        The field ``[B, d, *S]``.
    """
    check_field(v, "v")
    counts = _as_counts(n, v.shape[0], v.device)
    phi = torch.zeros_like(v)
    for j in range(int(counts.max().item()) if counts.numel() else 0):
        phi = _masked_compose(phi, v, counts > j, padding_mode)
    return phi


def sample_velocity(
    batch: int,
    control_shape: Sequence[int],
    levels: int = 4,
    sigma: float = 2.56e-3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Multi-scale Gaussian velocity on a control lattice (spec §1.2, "velocity sampler").

    ``v = Σ_i Up(2^i · sigma · ε_i)`` with ``ε_i ~ N(0, I)`` drawn on a lattice coarsened by ``2^i`` per axis
    (``ceil(C_a / 2^i)``, at least 2) and upsampled (bi/trilinear, ``align_corners=False``) to ``control_shape``.

    Args:
        batch: number of fields.
        control_shape: lattice size per axis (2 or 3 entries; may differ per axis).
        levels: number of scales (official: 4, i.e. 64, 32, 16, 8 for a 64 lattice).
        sigma: std of the finest level in **lattice voxels** (official ``v_scale`` 4e-5 × 64 = 2.56e-3).
        generator: random generator for reproducible draws.
        device: output device.
        dtype: output dtype.

    Returns:
        ``[batch, d, *control_shape]`` in lattice-voxel units.
    """
    shape = tuple(int(c) for c in control_shape)
    d = len(shape)
    if d not in (2, 3):
        raise ValueError(f"sample_velocity: control_shape must have 2 or 3 entries, got {shape}.")
    if levels < 1:
        raise ValueError(f"sample_velocity: levels must be >= 1, got {levels}.")
    mode = "bilinear" if d == 2 else "trilinear"
    v = torch.zeros((batch, d, *shape), device=device, dtype=dtype)
    with fp32(v.device):
        for i in range(levels):
            coarse = tuple(max(2, math.ceil(c / 2**i)) for c in shape)
            eps = torch.randn((batch, d, *coarse), generator=generator, dtype=dtype, device="cpu").to(device or "cpu")
            eps = eps * (sigma * 2**i)
            v = v + (eps if coarse == shape else F.interpolate(eps, size=shape, mode=mode, align_corners=False))
    return v


def linear_resize_matrix(
    in_size: int, out_size: int, start: int = 0, length: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rows ``[start, start + length)`` of the 1D linear-resize operator ``in_size -> out_size``.

    Matches ``F.interpolate(mode="linear", align_corners=False)`` exactly (edge clamping included), so a
    separable product of these matrices equals bi/trilinear upsampling followed by a crop, without ever
    materialising the enlarged field.

    Args:
        in_size: source length.
        out_size: length of the (virtual) resized signal.
        start: first output row kept.
        length: number of rows kept (default: all remaining).
        dtype: matrix dtype.

    Returns:
        ``[length, in_size]`` matrix.
    """
    length = out_size - start if length is None else length
    j = torch.arange(start, start + length, dtype=torch.float64)
    src = ((j + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo.double()
    mat = torch.zeros((length, in_size), dtype=torch.float64)
    rows = torch.arange(length)
    mat.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat.to(dtype)


def resize_crop_field(field: torch.Tensor, enlarged_shape: Sequence[int], crop_shape: Sequence[int]) -> torch.Tensor:
    """Upsample ``field`` to ``enlarged_shape`` (bi/trilinear, ``align_corners=False``) and centre-crop ``crop_shape``.

    Done separably with :func:`linear_resize_matrix`, so only the cropped result is materialised.

    Args:
        field: ``[B, C, *L]`` (2D or 3D).
        enlarged_shape: virtual upsampled size per axis.
        crop_shape: centre crop kept per axis (``<= enlarged_shape``).

    Returns:
        ``[B, C, *crop_shape]`` (float32 for fp16/bf16 inputs; computed with autocast disabled).
    """
    d = field.ndim - 2
    if len(enlarged_shape) != d or len(crop_shape) != d:
        raise ValueError(f"resize_crop_field: need {d} sizes, got {enlarged_shape} and {crop_shape}.")
    out = field = upcast(field)
    with fp32(field.device):  # the matrix products would run in bf16 under autocast
        for axis in range(d):
            big, keep = int(enlarged_shape[axis]), int(crop_shape[axis])
            if keep > big:
                raise ValueError(f"resize_crop_field: crop {keep} larger than the enlarged size {big} on axis {axis}.")
            mat = linear_resize_matrix(field.shape[2 + axis], big, (big - keep) // 2, keep, field.dtype)
            out = torch.movedim(torch.movedim(out, 2 + axis, -1) @ mat.to(field.device).T, -1, 2 + axis)
    return out.contiguous()


def field_to_physical(field: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Scale a voxel-unit field to physical units (channel ``i`` times ``spacing[i]``).

    Args:
        field: ``[B, d, *S]`` in voxels.
        spacing: voxel size per axis (e.g. mm).

    Returns:
        The field in physical units.
    """
    d = check_field(field)
    if len(spacing) != d:
        raise ValueError(f"field_to_physical: need {d} spacings, got {list(spacing)}.")
    scale = torch.as_tensor(list(spacing), dtype=field.dtype, device=field.device).view(1, d, *([1] * d))
    return field * scale


def jacobian_determinant(field: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """``det(I + ∇u)`` of the map ``x -> x + u(x)`` with central differences (one-sided at the borders).

    For a field in voxel units leave ``spacing`` as ``None``: the determinant is invariant to anisotropic
    voxel sizes. For a field in physical units (e.g. mm) pass the voxel ``spacing`` so derivatives are taken
    per physical length; both give the same determinant for the same deformation.

    Args:
        field: ``[B, d, *S]`` displacement (every spatial size >= 2).
        spacing: voxel size per axis when ``field`` is in physical units.

    Returns:
        ``[B, *S]`` determinant (float32 for fp16/bf16 fields).
    """
    d = check_field(field)
    field = upcast(field)
    if min(field.shape[2:]) < 2:
        raise ValueError(f"jacobian_determinant: every spatial size must be >= 2, got {tuple(field.shape[2:])}.")
    steps = [1.0] * d if spacing is None else [float(s) for s in spacing]
    if len(steps) != d:
        raise ValueError(f"jacobian_determinant: need {d} spacings, got {list(steps)}.")
    with fp32(field.device):
        # grads[i][j] = d u_i / d x_j, each [B, *S]
        grads = [torch.gradient(field[:, i], spacing=steps, dim=list(range(1, d + 1))) for i in range(d)]
        jac = [[grads[i][j] + (1.0 if i == j else 0.0) for j in range(d)] for i in range(d)]
        if d == 2:
            return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
        return (
            jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
        )


def folding_fraction(
    field: torch.Tensor, mask: torch.Tensor | None = None, spacing: Sequence[float] | None = None
) -> torch.Tensor:
    """Fraction of voxels with ``det(I + ∇u) <= 0`` per sample (optionally inside ``mask``).

    Args:
        field: ``[B, d, *S]``.
        mask: optional ``[B, 1, *S]`` or ``[B, *S]`` boolean region.
        spacing: as in :func:`jacobian_determinant`.

    Returns:
        ``[B]`` fractions in [0, 1].
    """
    folded = (jacobian_determinant(field, spacing) <= 0).float()
    if mask is None:
        return folded.flatten(1).mean(1)
    m = mask.reshape(folded.shape).float()
    return (folded * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1.0)

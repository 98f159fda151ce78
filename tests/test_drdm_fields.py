"""DRDM field algebra and forward process: schedules, warps, composition, powers, Jacobians (spec drdm.md §0-1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF

from drdm.diffusion import DeformationDiffusion, PowerSchedule
from drdm.fields import (
    check_field,
    compose,
    field_to_physical,
    flow_power,
    flow_power_sequential,
    folding_fraction,
    grid_sample_all_threads,
    jacobian_determinant,
    resize_crop_field,
    sample_velocity,
    warp,
)

SHAPES = {2: (24, 17), 3: (16, 13, 9)}  # non-square / non-cubic everywhere


pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth_field(shape, amplitude, seed=0):
    """A smooth random field (Gaussian values on a 4-point lattice, upsampled), max about ``3 * amplitude``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, len(shape), *([4] * len(shape)), generator=g) * amplitude
    return F.interpolate(coarse, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear", align_corners=True)


def _coords(shape):
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))[None]


def test_schedule_tables_match_spec():
    diffusion = DeformationDiffusion()
    t = torch.tensor([0, 1, 2, 3, 5, 8, 10, 16, 20, 24, 32, 40, 48, 56, 64, 72, 79, 80])
    big_n, small_n = diffusion.step_counts(t)
    assert big_n.tolist() == [1, 1, 1, 2, 5, 9, 13, 24, 32, 41, 60, 80, 102, 124, 148, 173, 195, 198]
    assert small_n.tolist() == [0, 1, 1, 1, 2, 3, 3, 5, 6, 6, 8, 9, 10, 11, 12, 13, 13, 13]
    assert int(diffusion.step_counts(torch.arange(1, 80))[1].sum()) == 648  # spec: sum n(s) != N(79)
    assert PowerSchedule(1.0, 1.0, 0, 5)(torch.tensor([0, 3, 9])).tolist() == [0, 3, 5]


@pytest.mark.parametrize("d", [2, 3])
def test_zero_field_is_identity_warp(d):
    image = torch.rand(2, 3, *SHAPES[d])
    out = warp(image, torch.zeros(2, d, *SHAPES[d]))
    assert torch.allclose(out, image, atol=1e-6)
    # an integer translation moves the content by exactly that many voxels along axis 0
    shift = torch.zeros(2, d, *SHAPES[d])
    shift[:, 0] = 2.0
    moved = warp(image, shift)
    assert torch.allclose(moved[:, :, :-2], image[:, :, 2:], atol=1e-5)


@pytest.mark.parametrize("d", [2, 3])
def test_compose_with_numerical_inverse_and_associativity(d):
    shape = SHAPES[d]
    u = _smooth_field(shape, 0.5)
    # fixed-point inverse of T_u: w = -u∘(id + w)
    w = -u.clone()
    for _ in range(30):
        w = -warp(u, w, padding_mode="border")
    assert compose(u, w).abs().max() < 1e-3 * max(1.0, float(u.abs().max()))
    assert float(u.abs().max()) > 0.3  # the test field is not trivially small
    a, b, c = u, _smooth_field(shape, 0.5, 1), _smooth_field(shape, 0.5, 2)
    err = (compose(compose(a, b), c) - compose(a, compose(b, c))).norm(dim=1)
    assert err.mean() < 0.05 * a.norm(dim=1).mean()  # interpolation tolerance
    assert err.max() < 0.25


@pytest.mark.parametrize("d", [2, 3])
def test_binary_power_matches_sequential_and_dvf2ddf(d):
    shape = (32, 27) if d == 2 else (16, 14, 12)
    v = sample_velocity(2, shape, levels=3, sigma=0.01, generator=torch.Generator().manual_seed(3))
    n = torch.tensor([13, 6])
    fast, slow = flow_power(v, n), flow_power_sequential(v, n)
    rel = (fast - slow).norm(dim=1).mean() / slow.norm(dim=1).mean()
    assert rel < 0.05
    assert float(slow.norm(dim=1).mean()) > 5 * float(v.norm(dim=1).mean())  # really integrated
    # per-sample counts: sample 1 equals its own single-sample power
    assert torch.allclose(fast[1:], flow_power(v[1:], 6), atol=1e-5)
    # zero steps -> zero field, one step -> v
    assert flow_power(v, 0).abs().max() == 0 and torch.allclose(flow_power(v, 1), v)
    # powers of two are exactly MONAI's scaling-and-squaring
    ref = DVF2DDF(num_steps=3, padding_mode="border")(8 * v)
    assert torch.allclose(flow_power(v, 8), ref, atol=1e-5)


def test_binary_power_is_closer_to_exact_euler_orbit_than_the_loop():
    """Against particle tracing of x_{k+1} = x_k + v(x_k), binary exponentiation blurs less than the loop."""
    v = sample_velocity(2, (48, 40), levels=4, sigma=4e-3, generator=torch.Generator().manual_seed(0)).double()
    n = 150
    exact = torch.zeros_like(v)
    for _ in range(n):
        exact = exact + warp(v, exact, padding_mode="border")
    inner = (slice(None), slice(None), slice(12, 36), slice(10, 30))
    err_fast = (flow_power(v, n) - exact)[inner].norm(dim=1).mean()
    err_slow = (flow_power_sequential(v, n) - exact)[inner].norm(dim=1).mean()
    assert err_fast < err_slow


def test_jacobian_of_analytic_fields():
    shape = (12, 10, 8)
    x = _coords(shape)
    assert torch.allclose(jacobian_determinant(torch.zeros(1, 3, *shape)), torch.ones(1, *shape))
    fold = torch.zeros(1, 3, *shape)
    fold[:, 0] = -2.0 * x[:, 0]  # u0 = -2 x0 -> det = -1 everywhere
    assert torch.allclose(jacobian_determinant(fold), -torch.ones(1, *shape), atol=1e-5)
    assert folding_fraction(fold).item() == 1.0
    a = torch.tensor([[0.2, 0.1, 0.0], [-0.3, 0.1, 0.05], [0.0, 0.2, -0.1]])
    affine = torch.einsum("ij,bj...->bi...", a, x)
    expected = torch.det(torch.eye(3) + a)
    assert torch.allclose(jacobian_determinant(affine), expected.expand(1, *shape), atol=1e-5)
    a2 = torch.tensor([[0.5, -0.25], [0.1, -0.3]])
    affine2 = torch.einsum("ij,bj...->bi...", a2, _coords((9, 7)))
    assert torch.allclose(jacobian_determinant(affine2), torch.det(torch.eye(2) + a2).expand(1, 9, 7), atol=1e-5)
    # physical units with anisotropic spacing give the same determinant as voxel units
    spacing = (1.5, 0.7, 3.0)
    assert torch.allclose(
        jacobian_determinant(field_to_physical(affine, spacing), spacing), jacobian_determinant(affine), atol=1e-5
    )


def test_folding_fraction_with_mask():
    field = torch.zeros(1, 2, 8, 6)
    field[:, 0, :4] = -2.0 * _coords((8, 6))[:, 0, :4]
    mask = torch.zeros(1, 1, 8, 6, dtype=torch.bool)
    mask[..., 6:, :] = True
    assert folding_fraction(field, mask).item() == 0.0
    assert 0.3 < folding_fraction(field).item() < 0.7


def test_resize_crop_equals_interpolate_then_crop():
    f = torch.randn(2, 3, 9, 7, 5)
    out = resize_crop_field(f, (18, 14, 10), (9, 7, 5))
    big = F.interpolate(f, size=(18, 14, 10), mode="trilinear", align_corners=False)
    assert torch.allclose(out, big[:, :, 4:13, 3:10, 2:7], atol=1e-5)


def test_field_validation_errors():
    with pytest.raises(ValueError, match="needs 3 components"):
        check_field(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="spatial shape"):
        warp(torch.zeros(1, 1, 5, 5), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match=">= 0"):
        flow_power(torch.zeros(1, 2, 4, 4), -1)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("threads", [2, 4])
def test_grid_sample_all_threads_is_bitwise_grid_sample(d, batch, threads):
    """The slab-split sampling returns exactly F.grid_sample's values (odd first axis: padded slabs), any mode."""
    torch.set_num_threads(threads)  # the one_thread fixture restores the count
    shape = (23, 10, 7)[:d]
    g = torch.Generator().manual_seed(batch * 10 + d)
    image = torch.randn(batch, 2, *shape, generator=g)
    grid = torch.rand(batch, *shape, d, generator=g) * 2.4 - 1.2
    for mode in ("bilinear", "nearest"):
        for padding_mode in ("zeros", "border", "reflection"):
            kwargs = {"mode": mode, "padding_mode": padding_mode, "align_corners": True}
            assert torch.equal(grid_sample_all_threads(image, grid, **kwargs), F.grid_sample(image, grid, **kwargs))


@pytest.mark.parametrize("d", [2, 3])
def test_grid_sample_all_threads_gradients_match(d):
    torch.set_num_threads(2)
    shape = (9, 8, 5)[:d]
    g = torch.Generator().manual_seed(d)
    image = torch.randn(1, 2, *shape, generator=g)
    grid = torch.rand(1, *shape, d, generator=g) * 2 - 1
    grads = []
    for fn in (grid_sample_all_threads, F.grid_sample):
        im, gr = image.clone().requires_grad_(), grid.clone().requires_grad_()
        (fn(im, gr, align_corners=True) ** 2).sum().backward()
        grads.append((im.grad, gr.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


@pytest.mark.parametrize("d", [2, 3])
def test_warp_is_bitwise_monai_warp(d):
    """``warp`` (cached identity grid, slab-split sampling on 2 threads) equals MONAI's Warp exactly."""
    from monai.networks.blocks import Warp

    torch.set_num_threads(2)
    shape = (SHAPES[d][0], 1, *SHAPES[d][2:])  # a singleton axis too
    g = torch.Generator().manual_seed(5)
    image = torch.randn(1, 2, *shape, generator=g)
    ddf = torch.randn(1, d, *shape, generator=g) * 3
    for mode in ("bilinear", "nearest"):
        for padding_mode in ("zeros", "border"):
            reference = Warp(mode, padding_mode)(image, ddf)
            assert torch.equal(warp(image, ddf, mode, padding_mode), reference)
            assert torch.equal(warp(image, ddf, mode, padding_mode), reference)  # the cached grid

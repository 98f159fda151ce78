"""DRDM forward process, recovery network and loss (spec drdm.md §1.2, §2.2, §2.3)."""

from __future__ import annotations

import pytest
import torch

from drdm.diffusion import DeformationDiffusion
from drdm.fields import folding_fraction, warp
from drdm.losses import DRDMLoss, negative_jacobian_penalty
from drdm.networks import RecoveryNet

SHAPES = {2: (40, 24), 3: (20, 16, 12)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_diffusion(**kw):
    return DeformationDiffusion(control_size=16, **kw)


@pytest.mark.parametrize("d", [2, 3])
def test_q_sample_shapes_and_levels(d):
    diffusion = _tiny_diffusion()
    image = torch.rand(2, 1, *SHAPES[d])
    out = diffusion.q_sample(image, torch.tensor([0, 40]), generator=torch.Generator().manual_seed(0))
    assert out.image.shape == image.shape
    assert out.step_field.shape == out.cumulative_field.shape == (2, d, *SHAPES[d])
    # t = 0: n(0) = 0 -> zero target; N(0) = 1 -> one small step
    assert out.step_field[0].abs().max() == 0
    assert 0 < out.cumulative_field[0].norm(dim=0).mean() < out.cumulative_field[1].norm(dim=0).mean()
    # the image is the original warped by the cumulative field
    assert torch.allclose(out.image, warp(image, out.cumulative_field), atol=1e-6)
    assert diffusion.control_shape(SHAPES[d])[0] == 16 and len(set(diffusion.control_shape(SHAPES[d]))) > 1


def test_fixed_seed_gives_identical_fields():
    diffusion = _tiny_diffusion()
    a = diffusion.sample_fields((24, 20), 30, generator=torch.Generator().manual_seed(5))
    b = diffusion.sample_fields((24, 20), 30, generator=torch.Generator().manual_seed(5))
    c = diffusion.sample_fields((24, 20), 30, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])


def test_gain_switch_and_fraction_scaling():
    """Official gain = (S/C)^2 voxels per lattice voxel: x2 the geometric one at S = 256, C = 64."""
    geo, off = DeformationDiffusion(), DeformationDiffusion(gain="official")
    assert geo.lift_factors((256, 256)) == [8.0, 8.0]
    assert off.lift_factors((256, 256)) == [16.0, 16.0]
    assert off.lift_factors((128, 128, 128)) == geo.lift_factors((128, 128, 128)) == [4.0, 4.0, 4.0]
    # same seed -> official field is exactly twice the geometric one in 2D 256^2
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    f_geo = geo.sample_fields((256, 256), 16, generator=g1, with_step=False)[1]
    f_off = off.sample_fields((256, 256), 16, generator=g2, with_step=False)[1]
    assert torch.allclose(f_off, 2 * f_geo, atol=1e-5)
    # deformation is a fraction of the image: mean |Psi_16| in 2D 256^2 is a few voxels (spec §1.3: official 7.0)
    assert 1.5 < float(f_geo.norm(dim=1).mean()) < 8.0
    assert folding_fraction(f_geo).item() == 0.0


def test_level_validation():
    diffusion = _tiny_diffusion()
    with pytest.raises(ValueError, match=r"\[0, 80\]"):
        diffusion.q_sample(torch.rand(1, 1, 16, 16), 81)
    with pytest.raises(ValueError, match="integers"):
        diffusion.check_levels(torch.tensor([2.5]), 1)
    with pytest.raises(ValueError, match="gain"):
        DeformationDiffusion(gain="quirky")


@pytest.mark.parametrize(("d", "expected"), [(2, 435_435), (3, 1_305_646)])
def test_network_size_matches_official_trainable_count(d, expected):
    """Spec §2.2: 443,435 (2D) / 1,313,646 (3D) parameters incl. the frozen 80x100 table we do not store."""
    net = RecoveryNet(d)
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize("d", [2, 3])
def test_network_is_identity_at_start_and_trains(d):
    torch.manual_seed(0)
    net = RecoveryNet(d, channels=(4, 8, 16))
    x = torch.rand(2, 1, *SHAPES[d][:-1], SHAPES[d][-1] - 1)  # sizes not divisible by 8
    out = net(x, torch.tensor([3, 50]))
    assert out.shape == (2, d, *x.shape[2:])
    assert out.abs().max() == 0  # zero-initialised head
    target = torch.randn_like(out)
    loss = ((net(x, torch.tensor([3, 50])) - target) ** 2).mean()
    loss.backward()
    assert net.head.weight.grad.abs().sum() > 0


def test_time_conditioning_changes_output():
    torch.manual_seed(0)
    net = RecoveryNet(2, channels=(4, 8, 16))
    torch.nn.init.normal_(net.head.weight, std=0.1)
    x = torch.rand(1, 1, 16, 16)
    assert not torch.allclose(net(x, 1), net(x, 60))


def test_loss_exact_inverse():
    """A constant translation psi and its exact inverse -psi: distance 0, angle -1."""
    psi = torch.zeros(1, 3, 12, 10, 8)
    psi[:, 0], psi[:, 1], psi[:, 2] = 1.5, -0.5, 0.25
    terms = DRDMLoss().terms(-psi, psi)
    assert terms["loss_dist"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["loss_ang"].item() == pytest.approx(-1.0, abs=1e-6)
    assert terms["loss_reg"].item() == pytest.approx(0.0, abs=1e-9)
    # a zero prediction: distance 1, angle 0
    zero = DRDMLoss().terms(torch.zeros_like(psi), psi)
    assert zero["loss_dist"].item() == pytest.approx(1.0, abs=1e-4) and zero["loss_ang"].item() == 0.0


def test_negative_jacobian_penalty_is_a_true_folding_penalty():
    x0 = torch.arange(10, dtype=torch.float32).view(1, 10, 1, 1).expand(1, 10, 9, 8)
    folded = torch.zeros(1, 3, 10, 9, 8)
    folded[:, 0] = -2.0 * x0  # det = -1 everywhere (the official "negdetj" gives 0 here)
    shear = torch.zeros(1, 3, 10, 9, 8)
    shear[:, 1] = 0.8 * x0  # det = 1, no folding
    assert negative_jacobian_penalty(folded).item() == pytest.approx(1.0, abs=1e-5)
    assert negative_jacobian_penalty(shear).item() == 0.0
    psi = torch.full_like(folded, 0.5)
    ours, official = DRDMLoss().terms(folded, psi), DRDMLoss(reg="l1").terms(folded, psi)
    assert ours["loss_reg"] - official["loss_reg"] == pytest.approx(2.0, abs=1e-4)  # negjac_weight 2 x 1.0
    with pytest.raises(ValueError, match="reg"):
        DRDMLoss(reg="negdetj")

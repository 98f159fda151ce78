"""RandDRDMDeformd as an invertible MONAI transform, its field bank, the inverse field and strided recovery."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, Invertd
from monai.utils import TraceKeys
from torch import nn

from drdm.diffusion import DeformationDiffusion
from drdm.fields import compose, invert_field, warp
from drdm.sampler import DRDMSampler
from drdm.transforms import RandDRDMDeformd

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {2: (40, 36), 3: (24, 20, 12)}


class _StepNet(nn.Module):
    """Stand-in recovery network: a constant step field ``c`` (zero by default); counts its calls."""

    def __init__(self, d: int, step: float = 0.0) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels, self.step = d, 1, step
        self.calls: list[int] = []
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(t[0]))
        return torch.full((x.shape[0], self.spatial_dims, *x.shape[2:]), self.step)


def _item(d: int) -> dict:
    grids = torch.meshgrid(*[torch.linspace(0, 2, s) for s in SHAPES[d]], indexing="ij")
    img = sum(torch.sin(1.5 * g + i) for i, g in enumerate(grids))[None] * 50 + 100
    idx = torch.meshgrid(*[torch.arange(s) for s in SHAPES[d]], indexing="ij")
    lab = ((idx[0] // 8) * 2 + (idx[1] // 9) % 2 + 1)[None].to(torch.uint8)
    affine = torch.diag(torch.tensor([1.5, 0.8, 2.0, 1.0]))
    return {"image": MetaTensor(img, affine=affine), "label": MetaTensor(lab, affine=affine)}


def _sampler(d: int, **kwargs) -> DRDMSampler:
    return DRDMSampler(_StepNet(d, **kwargs), DeformationDiffusion(control_size=8), folding_threshold=None)


def test_invert_field_fixed_point_accuracy():
    """Smooth ~2-voxel field: the residual compose(u, v) drops from |u| to interpolation error."""
    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(40.0), indexing="ij")
    u = torch.stack([2.0 * torch.sin(x / 7.0), 1.5 * torch.cos(y / 9.0)])[None]
    v = invert_field(u, 20)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert compose(u, -u)[inner].abs().max() > 0.2  # naive -u is not the inverse
    assert compose(u, v)[inner].abs().max() < 0.02  # v + u(x + v) = 0 to 1/50 voxel
    assert compose(v, u)[inner].abs().max() < 0.05  # and it is a two-sided inverse
    assert torch.equal(invert_field(u, 0), -u)
    with pytest.raises(ValueError, match="iterations"):
        invert_field(u, -1)


@pytest.mark.parametrize("d", [2, 3])
def test_invertd_round_trip(d):
    item = _item(d)
    deform = RandDRDMDeformd("image", _sampler(d), label_keys="label", t_prime=[8, 10], ddf_key="ddf")
    pipeline = Compose([EnsureTyped(["image", "label"]), deform])
    pipeline.set_random_state(seed=1)
    out = pipeline(dict(item))
    ops = out["image"].applied_operations
    assert ops[-1][TraceKeys.CLASS_NAME] == "RandDRDMDeformd" and ops[-1][TraceKeys.DO_TRANSFORM]
    assert torch.equal(ops[-1][TraceKeys.EXTRA_INFO]["ddf"], out["ddf"])
    assert out["label"].applied_operations[-1][TraceKeys.EXTRA_INFO]["kind"] == "label"
    moved = out["ddf"].norm(dim=0)
    assert moved.mean() > 0.3  # a real deformation (voxels)
    inv = Invertd(["image", "label"], pipeline, orig_keys=["image", "label"])(dict(out))
    inner = (slice(None), *[slice(4, -4)] * d)
    before = (out["image"] - item["image"])[inner].abs().mean()
    after = (inv["image"] - item["image"])[inner].abs().mean()
    assert after < 0.2 * before  # bilinear twice: blur remains, the geometry is undone
    assert inv["label"].dtype == item["label"].dtype
    assert set(inv["label"].unique().tolist()) <= set(item["label"].unique().tolist())
    same_before = (out["label"] == item["label"])[inner].float().mean()
    same_after = (inv["label"] == item["label"])[inner].float().mean()
    assert same_after > 0.95 and same_after > same_before
    assert torch.equal(inv["image"].affine, item["image"].affine)
    assert [op[TraceKeys.CLASS_NAME] for op in inv["image"].applied_operations] == []


def test_skipped_call_inverts_to_identity():
    item = _item(2)
    deform = RandDRDMDeformd("image", _sampler(2), label_keys="label", prob=0.0)
    out = deform(dict(item))
    assert torch.equal(out["image"], item["image"]) and item["image"].applied_operations == []
    assert out["image"].applied_operations[-1][TraceKeys.DO_TRANSFORM] is False
    back = deform.inverse(out)
    assert torch.equal(back["image"], item["image"]) and torch.equal(back["label"], item["label"])
    assert back["image"].applied_operations == []


def test_field_bank_reuse_refresh_and_reproducibility():
    item = _item(2)
    sampler = _sampler(2)
    deform = RandDRDMDeformd("image", sampler, t_prime=[3, 5], bank_size=2, refresh_every=4, ddf_key="ddf")
    deform.set_random_state(seed=0)
    fields, gens, bank = [], [], None
    for _ in range(5):
        out = deform(dict(item))
        bank = next(iter(deform._banks.values()))["fields"].clone() if bank is None else bank
        fields.append(out["ddf"])
        gens.append(out["image"].applied_operations[-1][TraceKeys.EXTRA_INFO]["bank_generation"])
    # one batched generation of 2 fields x 2 levels: recovery steps 5..1 once (rows share the loop)
    assert gens == [0, 0, 0, 0, 1]
    assert sampler.network.calls.count(5) == 2 and sampler.network.calls.count(1) == 2
    assert bank.shape == (4, 2, *SHAPES[2])  # 2 fields per level x 2 levels
    assert all(any(torch.equal(f, row) for row in bank) for f in fields[:4])  # every draw is a bank field
    assert not any(torch.equal(fields[4], row) for row in bank)  # the refreshed generation holds new fields
    deform.set_random_state(seed=0)  # clears the banks: the same seed gives the same sequence
    again = [deform(dict(item))["ddf"] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(fields, again))
    other = dict(item, image=item["image"] + 1.0)  # new content: its own bank
    deform(other)
    assert len(deform._banks) == 2
    listed = deform.bank_fields()  # per level, one tensor per banked image, the level's rows of its bank
    assert sorted(listed) == [3, 5] and all(len(v) == 2 for v in listed.values())
    first = next(iter(deform._banks.values()))["fields"]
    assert torch.equal(listed[3][0], first[:2]) and torch.equal(listed[5][0], first[2:])
    assert RandDRDMDeformd("image", sampler, t_prime=3, bank_size=2).bank_fields() == {}
    with pytest.raises(ValueError, match="bank_size"):
        RandDRDMDeformd("image", sampler, bank_size=-1)


def test_bank_off_matches_the_sampler_exactly():
    item = _item(2)
    sampler = _sampler(2)
    deform = RandDRDMDeformd("image", sampler, t_prime=4, ddf_key="ddf", normalise=False)
    deform.set_random_state(seed=5)
    out = deform(dict(item))
    seed = deform._seed
    ref = sampler.sample(item["image"].as_tensor()[None], 4, None, torch.Generator().manual_seed(seed)).ddf
    assert torch.equal(out["ddf"], ref[0])


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_recovery_stride_levels_and_constant_steps(stride):
    """Constant fields compose additively, so any stride recovers Ψ + (steps) c exactly (hand-computed)."""
    image = torch.rand(2, 1, 20, 16)
    sampler = DRDMSampler(_StepNet(2, step=0.25), DeformationDiffusion(control_size=8), recovery_stride=stride)
    rand = torch.tensor([0.1, -0.3]).view(2, 1, 1, 1).expand(2, 2, 20, 16).contiguous()
    out = sampler.recover(image, rand, [7, 4])
    assert sampler.recovery_levels(7) == list(range(7, 0, -stride))
    assert torch.allclose(out[0], rand[0] + 7 * 0.25, atol=1e-4)
    assert torch.allclose(out[1], rand[1] + 4 * 0.25, atol=1e-4)
    calls = len(sampler.network.calls)
    assert calls == len(range(7, 0, -stride)) + (len(range(4, 0, -stride)) if stride > 1 else 0)
    with pytest.raises(ValueError, match="recovery_stride"):
        DRDMSampler(_StepNet(2), DeformationDiffusion(), recovery_stride=0)


def test_warp_of_inverse_recovers_image_in_3d():
    """invert_field + warp undo a 3D field away from the border (image round trip, trilinear)."""
    z, y, x = torch.meshgrid(torch.arange(20.0), torch.arange(18.0), torch.arange(16.0), indexing="ij")
    u = torch.stack([1.5 * torch.sin(y / 5), 1.0 * torch.cos(x / 6), 0.8 * torch.sin(z / 4)])[None]
    img = (torch.sin(x / 4) + torch.cos(y / 5) + torch.sin(z / 3))[None, None]
    back = warp(warp(img, u), invert_field(u))
    inner = (slice(None), slice(None), *[slice(3, -3)] * 3)
    assert (back - img)[inner].abs().mean() < 0.1 * (warp(img, u) - img)[inner].abs().mean()

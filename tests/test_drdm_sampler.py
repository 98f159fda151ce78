"""DRDM sampling (Algorithms 2-4), label safety, folding guard and the RandDRDMDeformd transform."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped
from torch import nn

from drdm.diffusion import DeformationDiffusion
from drdm.fields import compose, warp
from drdm.networks import RecoveryNet
from drdm.sampler import DRDMSampler, warp_labels
from drdm.transforms import RandDRDMDeformd

SHAPES = {2: (36, 28), 3: (20, 16, 12)}


pytestmark = pytest.mark.usefixtures("one_thread")


class _RecordingNet(nn.Module):
    """Stand-in recovery network: returns a fixed field and records the levels it is called with."""

    def __init__(self, d: int, mode: str = "zero") -> None:
        super().__init__()
        self.spatial_dims, self.in_channels, self.mode = d, 1, mode
        self.levels: list[int] = []
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.levels.append(int(t[0]))
        out = torch.zeros(x.shape[0], self.spatial_dims, *x.shape[2:])
        if self.mode == "fold":  # u0 = -2 x0: det(I + grad u) = -1 everywhere
            out[:, 0] = -2.0 * torch.arange(x.shape[2], dtype=x.dtype).view(-1, *([1] * (self.spatial_dims - 1)))
        return out


def _image(d, batch=1):
    grids = torch.meshgrid(*[torch.linspace(0, 3, s) for s in SHAPES[d]], indexing="ij")
    img = sum(torch.sin(2 * g + i) for i, g in enumerate(grids))
    return ((img - img.min()) / (img.max() - img.min()))[None, None].repeat(batch, 1, *([1] * d))


def _labels(d, batch=1):
    idx = torch.meshgrid(*[torch.arange(s) for s in SHAPES[d]], indexing="ij")
    lab = (idx[0] // 6) * 3 + (idx[1] // 7) % 2 + 1  # values 1..k, no zero: a new 0 would be a bug
    return lab[None, None].repeat(batch, 1, *([1] * d)).to(torch.int16)


def _diffusion():
    return DeformationDiffusion(control_size=16)


@pytest.mark.parametrize("d", [2, 3])
def test_zero_network_returns_the_random_field_and_visits_levels(d):
    net = _RecordingNet(d)
    sampler = DRDMSampler(net, _diffusion())
    res = sampler.sample(_image(d), 5, _labels(d), torch.Generator().manual_seed(0))
    assert net.levels == [5, 4, 3, 2, 1]  # Algorithm 2: T', ..., 1
    assert torch.allclose(res.ddf, res.random_ddf, atol=1e-6)
    assert torch.allclose(res.image, warp(_image(d), res.ddf), atol=1e-6)
    assert res.ddf.shape == (1, d, *SHAPES[d]) and res.t_prime == 5 and bool(res.accepted.all())
    net.levels.clear()
    DRDMSampler(net, _diffusion(), start="all").sample(_image(d), 5)
    assert net.levels == list(range(79, -1, -1))  # official: all T steps whatever T'


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("mode", ["nearest", "onehot"])
def test_labels_stay_labels(d, mode):
    sampler = DRDMSampler(_RecordingNet(d), _diffusion(), label_mode=mode)
    labels = _labels(d)
    res = sampler.sample(_image(d), 40, labels, torch.Generator().manual_seed(1))
    assert res.labels.dtype == labels.dtype and res.labels.shape == labels.shape
    assert set(res.labels.unique().tolist()) <= set(labels.unique().tolist())
    assert (res.labels != labels).float().mean() > 0.005  # they did move


def test_onehot_label_warp_of_translation_is_exact():
    labels = _labels(2)
    shift = torch.zeros(1, 2, *SHAPES[2])
    shift[:, 1] = 3.0
    out = warp_labels(labels, shift, "onehot")
    assert torch.equal(out[..., :-3], labels[..., 3:])


def test_fixed_seed_identical_output_with_trained_like_network():
    torch.manual_seed(0)
    net = RecoveryNet(2, channels=(2, 4, 8))
    nn.init.normal_(net.head.weight, std=0.05)
    sampler = DRDMSampler(net, _diffusion())
    a = sampler.sample(_image(2), 3, generator=torch.Generator().manual_seed(7))
    b = sampler.sample(_image(2), 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.ddf, b.ddf) and torch.equal(a.image, b.image)
    assert not torch.allclose(a.ddf, a.random_ddf)  # the network did act


def test_folding_guard_retries_and_reports():
    sampler = DRDMSampler(_RecordingNet(2, "fold"), _diffusion(), max_retries=2, on_failure="raise")
    with pytest.raises(RuntimeError, match=r"folding guard.*after 3 draws"):
        sampler.sample(_image(2), 2)
    warn = DRDMSampler(_RecordingNet(2, "fold"), _diffusion(), max_retries=2, on_failure="warn")
    res = warn.sample(_image(2, batch=2), 2)
    assert res.attempts.tolist() == [3, 3] and not bool(res.accepted.any())
    assert res.folding_fraction.min() > 0.5
    ok = DRDMSampler(_RecordingNet(2), _diffusion(), max_retries=2).sample(_image(2), 2)
    assert ok.attempts.tolist() == [1] and bool(ok.accepted.all())


def test_bad_inputs_fail_early():
    sampler = DRDMSampler(_RecordingNet(2), _diffusion())
    with pytest.raises(ValueError, match=r"\[1, 80\]"):
        sampler.sample(_image(2), 0)
    with pytest.raises(ValueError, match=r"\[1, 80\]"):
        sampler.augment(_image(2), [10, 81])
    with pytest.raises(ValueError, match="does not match the image"):
        sampler.sample(_image(2), 3, torch.zeros(1, 1, 10, 10))
    with pytest.raises(ValueError, match="integer"):
        sampler.sample(_image(2), 3, torch.full((1, 1, *SHAPES[2]), 0.5))


def test_augment_and_registration_pair():
    sampler = DRDMSampler(_RecordingNet(3), _diffusion())
    image, labels = _image(3), _labels(3)
    outs = sampler.augment(image, [2, 4], 2, labels, torch.Generator().manual_seed(0))
    assert [o.t_prime for o in outs] == [2, 2, 4, 4]
    trip = sampler.registration_pair(image, 20, 20, labels, torch.Generator().manual_seed(0))
    assert torch.allclose(trip.moving, warp(image, trip.moving_result.ddf), atol=1e-6)
    assert torch.allclose(trip.source_to_fixed, compose(trip.moving_result.ddf, trip.ddf), atol=1e-6)
    # the ground-truth field maps moving onto fixed (up to one extra interpolation); compared away from the
    # border, where the moving image already holds zero padding (interior ratio 0.04-0.16 over 12 seeds)
    inner = (slice(None), slice(None), *[slice(3, -3)] * 3)
    err = (warp(trip.moving, trip.ddf) - trip.fixed)[inner].abs().mean()
    base = (trip.moving - trip.fixed)[inner].abs().mean()
    assert err < 0.25 * base
    assert set(trip.fixed_labels.unique().tolist()) <= set(labels.unique().tolist())


@pytest.mark.parametrize("d", [2, 3])
def test_transform_in_compose(d):
    sampler = DRDMSampler(_RecordingNet(d), _diffusion())
    affine = torch.diag(torch.tensor([1.5, 0.8, 2.0, 1.0]))
    item = {"image": MetaTensor(_image(d)[0] * 100 - 20, affine=affine), "label": _labels(d)[0]}
    deform = RandDRDMDeformd("image", sampler, label_keys="label", t_prime=[20, 30], ddf_key="ddf")
    pipeline = Compose([deform, EnsureTyped(["image", "label"])])
    pipeline.set_random_state(seed=3)
    out = pipeline(dict(item))
    pipeline.set_random_state(seed=3)
    again = pipeline(dict(item))
    assert torch.equal(out["image"], again["image"]) and torch.equal(out["ddf"], again["ddf"])
    assert isinstance(out["image"], MetaTensor) and torch.equal(out["image"].affine, affine.double())
    assert out["image"].shape == item["image"].shape and out["ddf"].shape == (d, *SHAPES[d])
    assert out["ddf"].abs().max() > 0 and not torch.allclose(out["image"], item["image"].as_tensor())
    assert set(out["label"].unique().tolist()) <= set(item["label"].unique().tolist())
    # background value (image minimum) fills what comes from outside, not 0
    assert out["image"].min() >= item["image"].min() - 1e-4
    skip = RandDRDMDeformd("image", sampler, label_keys="label", prob=0.0)(dict(item))
    assert torch.equal(skip["image"], item["image"])


def test_transform_bad_input():
    sampler = DRDMSampler(_RecordingNet(2), _diffusion())
    with pytest.raises(ValueError, match=r"\[1, 80\]"):
        RandDRDMDeformd("image", sampler, t_prime=[0])
    deform = RandDRDMDeformd("image", sampler, label_keys="label", t_prime=3)
    with pytest.raises(ValueError, match="does not match"):
        deform({"image": _image(2)[0], "label": torch.zeros(1, 5, 5)})


def test_warp_intensities_pads_with_the_image_minimum():
    from drdm.sampler import warp_intensities

    image = torch.full((1, 1, 4, 4), 5.0)
    image[0, 0, 1:3, 1:3] = 9.0
    image -= 1024.0  # a CT-like scale: the background is the minimum, not 0
    ddf = torch.zeros(1, 2, 4, 4)
    assert torch.equal(warp_intensities(image, ddf), image)  # identity field
    ddf[:, 0] = 10.0  # every voxel samples from outside the image
    out = warp_intensities(image, ddf)
    assert torch.allclose(out, torch.full_like(image, image.min().item()))


def _trained_like_net(channels: tuple[int, ...] = (2, 4, 8)) -> RecoveryNet:
    torch.manual_seed(0)
    net = RecoveryNet(2, channels=channels)
    nn.init.normal_(net.head.weight, std=0.05)
    return net


def test_compiled_network_gives_the_same_fields(monkeypatch):
    """``compile_network=True`` compiles the network once and reuses it; same seed -> the same fields.

    The compiler backend is swapped for dynamo's ``eager`` one so the test checks the sampler's wiring in seconds;
    inductor itself (max |Δ| 1e-6 voxels at 2D 256²) is timed and compared in ``benchmarks/drdm_sampling.py``.
    """
    compiled_modules = []
    real_compile = torch.compile

    def recording_compile(module, **kwargs):
        compiled_modules.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", recording_compile)
    net = _trained_like_net(channels=(2, 4))  # a small graph: dynamo traces it in a few seconds
    plain = DRDMSampler(net, _diffusion(), folding_threshold=None, batch_size=2)
    fast = DRDMSampler(net, _diffusion(), folding_threshold=None, batch_size=2, compile_network=True)
    a = plain.augment(_image(2), [2], 4, generator=torch.Generator().manual_seed(4))
    b = fast.augment(_image(2), [2], 4, generator=torch.Generator().manual_seed(4))
    assert compiled_modules == [net]  # compiled once for both chunks
    assert plain._compiled is None  # off: the network itself is called
    for x, y in zip(a, b):
        assert torch.allclose(x.ddf, y.ddf, atol=1e-5) and torch.equal(x.random_ddf, y.random_ddf)
    assert not torch.allclose(a[0].ddf, a[0].random_ddf)  # the network did act
    assert net.training  # the caller's mode is restored


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_compile_network_is_validated(bad):
    with pytest.raises(ValueError, match="compile_network must be true or false"):
        DRDMSampler(_RecordingNet(2), _diffusion(), compile_network=bad)


def test_new_sampler_knob_default_follows_the_config():
    import inspect
    import json
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "drdm_common.json"
    kwargs = json.loads(config.read_text())["sampler_kwargs"]
    assert kwargs["compile_network"] is inspect.signature(DRDMSampler).parameters["compile_network"].default

"""Tests of the DAMM two-branch denoiser (shapes, DAMMP gating, UAFM, heads, MONAI inferer, paper scale)."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler

from damm.networks import (
    PAPER_DENOISER_CONFIG,
    DAMMDenoiser,
    count_parameters,
    paper_denoiser_config,
    reference_forward_all,
)

# confidence_source "uni" (the official head, one linear layer) as these tests were written for; the default is the
# bundle's "joint" (tests/test_bundle_configs.py checks that the Python defaults follow the configs)
TINY = {
    "channels": (8, 8, 16, 16),
    "norm_num_groups": 4,
    "time_embed_dim": 32,
    "num_res_blocks": 1,
    "confidence_source": "uni",
}


def _tiny(spatial_dims: int = 2, num_auxiliary: int = 1, latent_channels: int = 2, **kw) -> DAMMDenoiser:
    args = {**TINY, **kw}
    return DAMMDenoiser(spatial_dims=spatial_dims, latent_channels=latent_channels, num_auxiliary=num_auxiliary, **args)


def _randomise_heads(model: DAMMDenoiser, std: float = 0.2) -> None:
    """The output heads are zero at init; give them weights so the two branches differ."""
    for head in (model.uni.out[-1], model.multi.out[-1]):
        for p in head.parameters():
            torch.nn.init.normal_(p, std=std)


def _inputs(model: DAMMDenoiser, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch, model.in_channels) + (size,) * model.spatial_dims
    return torch.randn(shape), torch.randint(0, 1000, (batch,))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("num_auxiliary", [1, 2, 3])
def test_shapes(spatial_dims: int, num_auxiliary: int) -> None:
    torch.manual_seed(0)
    model = _tiny(spatial_dims, num_auxiliary, confidence_source="joint" if num_auxiliary == 2 else "uni")
    size = 16 if spatial_dims == 2 else 8
    x, t = _inputs(model, 2, size)
    assert x.shape[1] == 2 * (2 + num_auxiliary)
    out = model.forward_all(x, t)
    lat = (2, 2) + (size,) * spatial_dims
    assert out.eps_uni.shape == lat and out.eps_multi.shape == lat and out.eps.shape == lat
    bottleneck = (size // 4,) * spatial_dims  # two downsamplings
    assert out.confidence_map.shape == (2, 1, *bottleneck)
    assert out.confidence.shape == (2,)
    assert torch.all((out.confidence > 0) & (out.confidence < 1))
    torch.testing.assert_close(out.confidence, out.confidence_map.flatten(1).mean(1))
    assert model(x, t).shape == lat


def test_zero_heads_give_zero_eps_at_init() -> None:
    torch.manual_seed(0)
    model = _tiny(num_auxiliary=2)
    x, t = _inputs(model, 3, 16)
    out = model.forward_all(x, t)
    assert torch.count_nonzero(out.eps_uni) == 0
    assert torch.count_nonzero(out.eps_multi) == 0
    assert torch.count_nonzero(model(x, t)) == 0
    # but the trunk is not degenerate: the heads see non-zero features
    _randomise_heads(model)
    assert model.forward_all(x, t).eps_multi.abs().sum() > 0


def test_gating_selects_per_sample() -> None:
    torch.manual_seed(1)
    model = _tiny()
    _randomise_heads(model)
    x, t = _inputs(model, 6, 16)
    conf = model.forward_all(x, t).confidence.detach()
    model.gamma = float(conf.sort().values[2:4].mean())  # between the 3rd and 4th value: 3 uni, 3 multi
    out = model.forward_all(x, t)
    use_uni = out.confidence < model.gamma
    assert 0 < int(use_uni.sum()) < 6
    for i in range(6):
        expected = out.eps_uni[i] if use_uni[i] else out.eps_multi[i]
        torch.testing.assert_close(out.eps[i], expected, rtol=0, atol=0)
    assert not torch.equal(out.eps_uni, out.eps_multi)
    model.gamma = 0.0
    torch.testing.assert_close(model(x, t), out.eps_multi)
    model.gamma = 1.0
    torch.testing.assert_close(model(x, t), out.eps_uni)


@pytest.mark.parametrize("confidence_source", ["uni", "joint", "conditions"])
def test_batched_gating_equals_per_sample_loop(confidence_source: str) -> None:
    torch.manual_seed(2)
    model = _tiny(num_auxiliary=2, confidence_source=confidence_source)
    _randomise_heads(model)
    x, t = _inputs(model, 5, 16)
    conf = model.forward_all(x, t).confidence.detach()
    ranked = conf.flatten().sort().values  # gamma between two samples' confidences, never on one (a tie at the
    model.gamma = float(0.5 * (ranked[1] + ranked[2]))  # boundary would route by float rounding)
    weight = torch.randn(5, 2, 16, 16)

    out = model.forward_all(x, t)
    assert 0 < int((out.confidence < model.gamma).sum()) < 5
    grads = torch.autograd.grad((out.eps * weight).sum() + out.confidence.sum(), list(model.parameters()))
    ref = reference_forward_all(model, x, t)
    ref_grads = torch.autograd.grad((ref.eps * weight).sum() + ref.confidence.sum(), list(model.parameters()))

    for name in ("eps", "eps_uni", "eps_multi", "confidence", "confidence_map"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-4, atol=1e-5)
    # gradients reach |g| ~ 40 here: fp32 sums in another order differ by ~1e-6 of the tensor's scale (measured up
    # to 3e-5 absolute on an AMD EPYC), so the absolute tolerance follows the scale; a sample routed to the wrong
    # branch changes the gradients by the order of the gradients themselves
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=max(1e-5, 4e-6 * float(rg.abs().max())))


def test_batchnorm_option_depends_on_batch_in_training_mode() -> None:
    torch.manual_seed(3)
    model = _tiny(norm="batch")
    _randomise_heads(model)
    x, t = _inputs(model, 4, 16)
    model.train()
    batched = model.forward_all(x, t).eps_multi
    per_sample = reference_forward_all(model, x, t).eps_multi
    assert not torch.allclose(batched, per_sample, atol=1e-4)  # the official micro-batch-1 issue
    model.eval()
    torch.testing.assert_close(model.forward_all(x, t).eps_multi, reference_forward_all(model, x, t).eps_multi)


def test_use_uncertainty_false_ignores_u() -> None:
    torch.manual_seed(4)
    model = _tiny()
    _randomise_heads(model)
    x, t = _inputs(model, 2, 16)
    with torch.no_grad():
        off = model.forward_all(x, t, use_uncertainty=False).eps_multi
        on = model.forward_all(x, t, use_uncertainty=True).eps_multi
        for p in model.uafm.confidence_head.parameters():
            p.add_(torch.randn_like(p))
        off2 = model.forward_all(x, t, use_uncertainty=False).eps_multi
        on2 = model.forward_all(x, t, use_uncertainty=True).eps_multi
        assert not torch.allclose(on, off)
        torch.testing.assert_close(off, off2, rtol=0, atol=0)
        assert not torch.allclose(on, on2)
        # u == 1 everywhere turns the uncertainty-weighted attention into plain cross-attention
        head = model.uafm.confidence_head
        head.weight.zero_()
        head.bias.fill_(60.0)
        out = model.forward_all(x, t, use_uncertainty=True)
        torch.testing.assert_close(out.confidence, torch.ones(2))
        torch.testing.assert_close(out.eps_multi, off)


def test_confidence_source_uni_is_blind_to_auxiliary_joint_is_not() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 6, 16, 16)
    t = torch.tensor([10, 500])
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16, 16)  # a different auxiliary latent
    uni = _tiny(confidence_source="uni")
    torch.testing.assert_close(uni.forward_all(x, t).confidence, uni.forward_all(x2, t).confidence)
    joint = _tiny(confidence_source="joint")
    assert not torch.allclose(joint.forward_all(x, t).confidence, joint.forward_all(x2, t).confidence)


def test_branch_option() -> None:
    torch.manual_seed(6)
    model = _tiny(num_auxiliary=3)
    _randomise_heads(model)
    x, t = _inputs(model, 2, 16)
    full = model.forward_all(x, t)
    model.branch = "uni"
    torch.testing.assert_close(model(x, t), full.eps_uni)
    torch.testing.assert_close(model.forward_all(x, t).eps, full.eps_uni)
    model.branch = "multi"
    torch.testing.assert_close(model(x, t), full.eps_multi)
    # the uni-modal branch never sees the auxiliary latents
    x_aux = x.clone()
    x_aux[:, 4:] += 1.0
    model.branch = "uni"
    torch.testing.assert_close(model(x_aux, t), full.eps_uni)
    model.branch = "bogus"
    with pytest.raises(ValueError, match="branch must be"):
        model(x, t)


def test_forward_inside_monai_diffusion_inferer_concat() -> None:
    torch.manual_seed(7)
    model = _tiny(num_auxiliary=2)
    _randomise_heads(model)
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.002, beta_end=0.02)
    inferer = DiffusionInferer(scheduler)
    z0 = torch.randn(2, 2, 16, 16)
    cond = torch.randn(2, 6, 16, 16)  # anchor + two auxiliary latents
    noise = torch.randn_like(z0)
    t = torch.randint(0, 1000, (2,))
    pred = inferer(inputs=z0, diffusion_model=model, noise=noise, timesteps=t, condition=cond, mode="concat")
    x_t = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
    torch.testing.assert_close(pred, model.forward_all(torch.cat([x_t, cond], 1), t).eps)
    scheduler.set_timesteps(num_inference_steps=3)
    with torch.no_grad():
        sample = inferer.sample(
            input_noise=torch.randn(2, 2, 16, 16),
            diffusion_model=model,
            scheduler=scheduler,
            conditioning=cond,
            mode="concat",
            verbose=False,
        )
    assert sample.shape == (2, 2, 16, 16) and torch.isfinite(sample).all()


def test_paper_scale_parameter_count() -> None:
    with torch.device("meta"):
        model = DAMMDenoiser(**PAPER_DENOISER_CONFIG)
    n = count_parameters(model)
    assert abs(n - 111.5e6) / 111.5e6 <= 0.15
    # the structure is that of the official model (spec §2.9), so the count is within 0.1 %
    assert abs(n - 111_457_617) / 111_457_617 < 1e-3
    assert [m.gate_uni.gate[0].in_channels for m in model.mmfm] == [64, 128, 128, 128, 256, 256, 256, 512, 512]
    assert len(model.uni.decoder) == 9 and model.downsample_factor == 4
    assert count_parameters(model.uafm) == 1_052_161  # GN + q/k/v/out + Linear(512 -> 1), as in the spec
    assert paper_denoiser_config(num_auxiliary=3)["num_auxiliary"] == 3
    assert PAPER_DENOISER_CONFIG["num_auxiliary"] == 1  # the helper returned a copy


def test_bad_inputs_raise_clear_errors() -> None:
    model = _tiny(num_auxiliary=2)  # expects 2 * (2 + 2) = 8 channels
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="expects 8 input channels"):
        model(torch.randn(2, 6, 16, 16), t)
    with pytest.raises(ValueError, match="divisible by the denoiser's total downsampling 4"):
        model(torch.randn(2, 8, 18, 16), t)
    with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\)"):
        model(torch.randn(2, 8, 16, 16), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\)"):
        model(torch.randn(2, 8, 16, 16), torch.ones(2, 1))
    with pytest.raises(ValueError, match="2 spatial dims"):
        model(torch.randn(2, 8, 16, 16, 16), t)
    with pytest.raises(ValueError, match="context must be None"):
        model(torch.randn(2, 8, 16, 16), t, context=torch.randn(2, 1, 4))
    # scalar / single timestep broadcast to the batch (as DiffusionInferer.sample passes it)
    x = torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(model(x, torch.tensor([5.0])), model(x, torch.tensor([5, 5])))
    with pytest.raises(ValueError, match="num_auxiliary must be >= 1"):
        _tiny(num_auxiliary=0)
    with pytest.raises(ValueError, match="norm_num_groups=4 must divide"):
        _tiny(channels=(8, 8, 16, 18))
    with pytest.raises(ValueError, match="confidence_source"):
        _tiny(confidence_source="aux")
    with pytest.raises(ValueError, match="norm must be"):
        _tiny(norm="instance")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_conditions_confidence_depends_on_the_conditions_only(spatial_dims: int) -> None:
    """confidence_source "conditions": one u per sample (every token), blind to x_t and t, trained by the BCE."""
    from damm.engines.diffusion_trainer import confidence_parameters
    from damm.networks.fusion import UAFM

    torch.manual_seed(4)
    model = _tiny(spatial_dims, num_auxiliary=2, confidence_source="conditions")
    x, t = _inputs(model, 3, 16)
    out = model.forward_all(x, t)
    u = out.confidence_map.flatten(1)
    torch.testing.assert_close(u, u[:, :1].expand_as(u))  # the same u for every token
    x2 = x.clone()
    x2[:, : model.latent_channels] = torch.randn_like(x2[:, : model.latent_channels])
    torch.testing.assert_close(model.forward_all(x2, torch.randint(0, 1000, (3,))).confidence, out.confidence)
    x3 = x.clone()
    x3[:, -model.latent_channels :] = torch.randn_like(x3[:, -model.latent_channels :])  # another auxiliary image
    assert not torch.allclose(model.forward_all(x3, t).confidence, out.confidence)
    names = [n for n, _ in confidence_parameters(model)]
    assert names and all(n.startswith("uafm.confidence_head.") for n in names)  # the calibration phase finds it
    grads = torch.autograd.grad(out.confidence.sum(), [p for _, p in confidence_parameters(model)])
    assert all(float(g.abs().sum()) > 0 for g in grads)
    uafm = UAFM(spatial_dims, 16, num_groups=4, confidence_source="conditions", condition_channels=6)
    with pytest.raises(ValueError, match="condition latents"):
        uafm(torch.randn((1, 16) + (4,) * spatial_dims), torch.randn((1, 16) + (4,) * spatial_dims))
    with pytest.raises(ValueError, match="condition_channels"):
        UAFM(spatial_dims, 16, num_groups=4, confidence_source="conditions")
    with pytest.raises(ValueError, match="confidence_source"):
        UAFM(spatial_dims, 16, num_groups=4, confidence_source="other")

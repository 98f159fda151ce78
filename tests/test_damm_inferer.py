"""DAMMInferer: sampling loop, branches, K samples, seeds, schedulers, input forms (real DAMM classes, tiny)."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from damm.inferers import DAMMInferer
from damm.model import DAMMModel, build_autoencoders
from damm.networks import DAMMDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.002, beta_end=0.02, clip_sample=False
    )


def _model(spatial_dims: int = 2, n_aux: int = 1, seed: int = 0) -> DAMMModel:
    torch.manual_seed(seed)
    conditions = ["vessel"] + [f"aux{i}" for i in range(n_aux)]
    aes = build_autoencoders(
        ["np_signal", *conditions], spatial_dims=spatial_dims, channels=(8, 8), latent_channels=2, norm_num_groups=4
    )
    den = DAMMDenoiser(
        spatial_dims=spatial_dims,
        latent_channels=2,
        num_auxiliary=n_aux,
        channels=(8, 8, 8),
        num_res_blocks=1,
        norm_num_groups=4,
        time_embed_dim=16,
    )
    # non-zero output heads so the two branches differ
    with torch.no_grad():
        for p in den.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.1)
    return DAMMModel(aes, den, "np_signal", conditions).eval()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_confidence_and_choices(spatial_dims):
    model = _model(spatial_dims)
    size = (8,) * spatial_dims
    x = torch.rand(3, 2, *size) * 2 - 1
    inf = DAMMInferer(
        _scheduler(), batch_size=None, sampler="ddim", num_inference_steps=4, num_samples=2, seed=1, keep_samples=True
    )
    assert isinstance(inf, Inferer)
    out = inf.sample(x, model)
    assert out.prediction.shape == (3, 1, *size)
    assert out.samples.shape == (3, 2, 1, *size)
    assert torch.allclose(out.prediction, out.samples.mean(dim=1), atol=1e-6)
    assert torch.allclose(out.std, out.samples.std(dim=1, unbiased=False), atol=1e-6)
    assert out.confidence_map.shape == (3, 1, *size)
    assert ((out.confidence_map > 0) & (out.confidence_map < 1)).all()
    assert out.confidence.shape == out.branch_choices.shape == (3, 2, 4)
    gamma = model.denoiser.gamma
    assert torch.equal(out.branch_choices, out.confidence >= gamma)  # DAMMP rule at every step
    assert out.timesteps == sorted(out.timesteps, reverse=True) and len(out.timesteps) == 4
    stats = out.statistics()
    assert len(stats) == 3 and len(stats[0]["steps_first_sample"]) == 4
    # __call__ is the MONAI Inferer entry point: returns the prediction
    assert torch.allclose(inf(x, model), out.prediction)


def test_forced_branches_and_gamma_extremes():
    model = _model()
    x = torch.rand(2, 2, 8, 8) * 2 - 1
    base = DAMMInferer(_scheduler(), batch_size=None, num_inference_steps=3, seed=0)
    uni = base.replace(branch="uni").sample(x, model)
    multi = base.replace(branch="multi").sample(x, model)
    assert not uni.branch_choices.any() and uni.confidence is None
    assert multi.branch_choices.all()
    assert not torch.allclose(uni.prediction, multi.prediction)
    # gamma = 1: c < gamma always -> the gated run is the uni run; gamma = 0 -> the multi run
    model.denoiser.gamma = 1.0
    assert torch.allclose(base.sample(x, model).prediction, uni.prediction, atol=1e-5)
    model.denoiser.gamma = 0.0
    assert torch.allclose(base.sample(x, model).prediction, multi.prediction, atol=1e-5)


def test_seed_reproducibility_and_batching():
    model = _model()
    x = torch.rand(5, 2, 8, 8) * 2 - 1
    a = DAMMInferer(_scheduler(), batch_size=None, num_inference_steps=3, seed=7, eta=0.5).sample(x, model)
    b = DAMMInferer(_scheduler(), batch_size=None, num_inference_steps=3, seed=7, eta=0.5).sample(x, model)
    c = DAMMInferer(_scheduler(), batch_size=None, num_inference_steps=3, seed=8, eta=0.5).sample(x, model)
    assert torch.equal(a.prediction, b.prediction)
    assert not torch.allclose(a.prediction, c.prediction)
    # batched: every input gets a prediction; the first batch is the same as sampling those inputs alone
    d = DAMMInferer(_scheduler(), num_inference_steps=3, seed=7, eta=0.5, batch_size=2).sample(x, model)
    e = DAMMInferer(_scheduler(), batch_size=None, num_inference_steps=3, seed=7, eta=0.5).sample(x[:2], model)
    assert d.prediction.shape == a.prediction.shape and d.branch_choices.shape == (5, 1, 3)
    assert torch.allclose(d.prediction[:2], e.prediction, atol=1e-5)


def test_input_forms_agree():
    model = _model(n_aux=2)
    v, a0, a1 = (torch.rand(2, 1, 8, 8) * 2 - 1 for _ in range(3))
    inf = DAMMInferer(_scheduler(), batch_size=None, num_inference_steps=2, seed=0)
    stacked = inf.sample(torch.cat([v, a0, a1], dim=1), model).prediction
    as_list = inf.sample([v, a0, a1], model).prediction
    as_dict = inf.sample({"aux1": a1, "vessel": v, "aux0": a0}, model).prediction
    assert torch.equal(stacked, as_list) and torch.equal(stacked, as_dict)
    with pytest.raises(ValueError, match="3 condition"):
        inf.sample([v, a0], model)
    with pytest.raises(ValueError, match="aux1"):
        inf.sample({"vessel": v, "aux0": a0}, model)


def test_ddim_schedule_matches_training_and_ddpm_runs_all_steps():
    sched = _scheduler()
    inf = DAMMInferer(sched, batch_size=None, sampler="ddim", num_inference_steps=10)
    ddim = inf.make_sampling_scheduler()
    assert isinstance(ddim, DDIMScheduler)
    assert torch.allclose(ddim.alphas_cumprod, sched.alphas_cumprod)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(7.47e-5, rel=0.02)  # spec damm.md §3.1
    assert len(ddim.timesteps) == 10 and int(ddim.timesteps[0]) == 900
    ddpm = inf.replace(sampler="ddpm").make_sampling_scheduler()
    assert isinstance(ddpm, DDPMScheduler) and len(ddpm.timesteps) == 1000
    with pytest.raises(ValueError, match="DDPM sampling runs all 1000"):
        DAMMInferer(sched, batch_size=None, sampler="ddpm", num_inference_steps=50)
    with pytest.raises(ValueError, match="branch"):
        DAMMInferer(sched, batch_size=None, branch="both")


def test_ddim_eta1_over_all_steps_equals_ddpm():
    """Spec damm.md §3.3: DDIM with eta = 1 over every training step is the DDPM ancestral sampler."""
    model = _model()
    sched = DDPMScheduler(
        num_train_timesteps=100, schedule="scaled_linear_beta", beta_start=0.002, beta_end=0.2, clip_sample=False
    )
    x = torch.rand(2, 2, 8, 8) * 2 - 1
    ddpm = DAMMInferer(sched, batch_size=None, sampler="ddpm", num_inference_steps=None, seed=3).sample(x, model)
    ddim = DAMMInferer(sched, batch_size=None, sampler="ddim", num_inference_steps=100, eta=1.0, seed=3).sample(
        x, model
    )
    ddim0 = DAMMInferer(sched, batch_size=None, sampler="ddim", num_inference_steps=100, eta=0.0, seed=3).sample(
        x, model
    )
    assert torch.allclose(ddpm.prediction, ddim.prediction, atol=1e-4)
    assert not torch.allclose(ddpm.prediction, ddim0.prediction, atol=1e-3)


def test_noise_prediction_uses_scheduler_add_noise():
    model = _model()
    sched = _scheduler()
    inf = DAMMInferer(sched, batch_size=None)
    z0 = torch.randn(2, 2, 8, 8)
    noise = torch.randn_like(z0)
    t = torch.tensor([10, 900])
    conds = [torch.randn_like(z0), torch.randn_like(z0)]
    out = inf.noise_prediction(model.denoiser, z0, conds, noise, t)
    ref = model.denoiser.forward_all(torch.cat([sched.add_noise(z0, noise, t), *conds], dim=1), t)
    assert torch.allclose(out.eps_uni, ref.eps_uni) and torch.allclose(out.eps_multi, ref.eps_multi)

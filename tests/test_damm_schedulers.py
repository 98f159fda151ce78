"""damm.schedulers: DPM-Solver++(2M), the PNDM (PLMS) grid and the inferer's few-step samplers (hand-checked cases)."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from damm.engines.synthesis import describe_scheduler
from damm.inferers import DAMMInferer
from damm.networks import DAMMOutput
from damm.schedulers import (
    SAMPLERS,
    DPMSolverMultistepScheduler,
    PLMSScheduler,
    copy_schedule,
    make_sampling_scheduler,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _training(prediction_type: str = "epsilon", steps: int = 1000) -> DDPMScheduler:
    """The bundle's training schedule (scaled linear betas 0.002 -> 0.02)."""
    return DDPMScheduler(
        num_train_timesteps=steps,
        schedule="scaled_linear_beta",
        beta_start=0.002,
        beta_end=0.02,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def _alpha_sigma(sched, t: int) -> tuple[float, float]:
    a = float(sched.alphas_cumprod[t].double())
    return math.sqrt(a), math.sqrt(1.0 - a)


def _oracle_run(sched, x0: torch.Tensor, noise: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Sample from x_T = alpha x0 + sigma noise with a model that is exact for this x0 (eps or v of (x, t))."""
    ts = [int(t) for t in sched.timesteps]
    alpha, sigma = _alpha_sigma(sched, ts[0])
    x = alpha * x0 + sigma * noise
    for t in ts:
        alpha, sigma = _alpha_sigma(sched, t)
        eps = (x - alpha * x0) / sigma  # the true noise of x given x0
        out = eps if prediction_type == "epsilon" else alpha * eps - sigma * x0
        x, _ = sched.step(out, t, x)
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 7, 10, 25])
def test_dpm_solver_recovers_x0_with_an_exact_model(prediction_type, steps):
    """Data-prediction form: an exact model keeps x on alpha x0 + sigma eps, so any step count lands on x0."""
    g = torch.Generator().manual_seed(steps)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g).double(), torch.randn(2, 3, 4, 4, generator=g).double()
    sched = make_sampling_scheduler("dpm_solver", _training(prediction_type), steps)
    assert isinstance(sched, DPMSolverMultistepScheduler) and sched.prediction_type == prediction_type
    assert torch.allclose(_oracle_run(sched, x0, noise, prediction_type), x0, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm_grid_recovers_x0_with_an_exact_model_and_monai_grid_does_not(prediction_type):
    """PLMS's second evaluation re-does the first step: its timestep is listed twice (N + 1 evaluations)."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g).double(), torch.randn(2, 3, 4, 4, generator=g).double()
    sched = make_sampling_scheduler("pndm", _training(prediction_type), 10)
    assert isinstance(sched, PLMSScheduler) and isinstance(sched, PNDMScheduler) and sched.skip_prk_steps
    assert sched.timesteps.tolist() == [900, 800, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert torch.allclose(_oracle_run(sched, x0, noise, prediction_type), x0, atol=1e-5)
    # MONAI's own PLMS grid lists 800 once: from the third evaluation on the model is told a timestep too low
    stock = make_sampling_scheduler("pndm", _training(prediction_type), 10)
    PNDMScheduler.set_timesteps(stock, 10)
    assert len(stock.timesteps) == 10
    assert not torch.allclose(_oracle_run(stock, x0, noise, prediction_type), x0, atol=1e-2)
    if prediction_type == "v_prediction":  # MONAI's own v handling: the multistep mix of v is not exact
        monai = PNDMScheduler(1000, skip_prk_steps=True, set_alpha_to_one=True, prediction_type=prediction_type)
        copy_schedule(_training(), monai)
        monai.set_timesteps(10)
        monai.timesteps = sched.timesteps
        assert not torch.allclose(_oracle_run(monai, x0, noise, prediction_type), x0, atol=1e-2)


def test_first_order_dpm_solver_is_ddim_with_eta_zero():
    """DPM-Solver++(1) is DDIM (eta = 0); the 2M solver's first step is that step, its second one is not."""
    training = _training()
    ddim = make_sampling_scheduler("ddim", training, 10)
    first = DPMSolverMultistepScheduler(1000, solver_order=1, timestep_spacing="leading")
    second = DPMSolverMultistepScheduler(1000, solver_order=2, timestep_spacing="leading")
    for s in (first, second):
        copy_schedule(training, s)
        s.set_timesteps(10)
        assert torch.equal(s.timesteps, ddim.timesteps)

    def model(x, t):
        return torch.tanh(x) * 0.7 + 0.001 * t

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x_ddim, x_1, x_2 = x.clone(), x.clone(), x.clone()
    for i, t in enumerate(int(t) for t in ddim.timesteps):
        x_ddim, x0_ddim = ddim.step(model(x_ddim, t), t, x_ddim, eta=0.0)
        x_1, x0_1 = first.step(model(x_1, t), t, x_1)
        assert torch.allclose(x_1, x_ddim, atol=1e-5) and torch.allclose(x0_1, x0_ddim, atol=1e-5)
        step_2 = second.step(model(x_2, t), t, x_2)[0]
        if i == 0:
            assert torch.allclose(step_2, x_ddim, atol=1e-5)
        elif i == 1:
            assert not torch.allclose(step_2, x_1, atol=1e-3)
        x_2 = step_2
    with pytest.raises(ValueError, match="all 10 steps done"):
        first.step(x_1, 0, x_1)


def _gaussian_error(order: int, steps: int, var: float = 4.0) -> float:
    """Max relative error for x0 ~ N(0, var): E[x0 | x_t] is known, the ODE maps x_T to x_T * sqrt(var / v_T)."""
    sched = DPMSolverMultistepScheduler(1000, solver_order=order, timestep_spacing="leading")
    copy_schedule(_training(), sched)
    sched.set_timesteps(steps)
    x_t = torch.randn(1000, generator=torch.Generator().manual_seed(1)).double()
    x = x_t.clone()
    for t in (int(t) for t in sched.timesteps):
        alpha, sigma = _alpha_sigma(sched, t)
        x0 = alpha * var / (alpha**2 * var + sigma**2) * x
        x, _ = sched.step((x - alpha * x0) / sigma, t, x)
    alpha, sigma = _alpha_sigma(sched, int(sched.timesteps[0]))
    exact = x_t * math.sqrt(var / (alpha**2 * var + sigma**2))
    return float((x - exact).abs().max() / exact.abs().max())


def test_dpm_solver_is_second_order_on_gaussian_data():
    """Doubling the steps divides the 2M error by about 4 (measured 3.7) and the first-order error by 2 (1.95)."""
    e1 = [_gaussian_error(1, n) for n in (80, 160)]
    e2 = [_gaussian_error(2, n) for n in (80, 160)]
    assert e1[0] / e1[1] < 2.5 and e2[0] / e2[1] > 3.0
    assert e2[1] < e1[1] / 4


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize(
    ("train_steps", "steps"), [(1000, 1), (1000, 3), (1000, 7), (1000, 10), (1000, 999), (1000, 1000), (100, 30)]
)
def test_dpm_solver_timesteps(spacing, train_steps, steps):
    sched = DPMSolverMultistepScheduler(train_steps, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    ts = sched.timesteps.tolist()
    assert len(ts) == steps and sched.num_inference_steps == steps
    assert all(a > b for a, b in itertools.pairwise(ts)) and ts[-1] >= 0 and ts[0] < train_steps
    if spacing == "trailing":  # starts at T - 1, strides of T / N
        assert ts[0] == train_steps - 1 and ts[-1] == train_steps // steps - 1
    else:  # the DDIM grid: ends at 0
        assert ts[-1] == 0 and ts[0] == (steps - 1) * (train_steps // steps)
    if (train_steps, steps) == (1000, 10):
        assert ts == (
            [999, 899, 799, 699, 599, 499, 399, 299, 199, 99] if spacing == "trailing" else list(range(900, -1, -100))
        )


def test_dpm_solver_refuses_bad_settings():
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        DPMSolverMultistepScheduler(100).set_timesteps(101)
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepScheduler(100, solver_order=3)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DPMSolverMultistepScheduler(100, timestep_spacing="middle")
    with pytest.raises(ValueError, match="prediction_type"):
        DPMSolverMultistepScheduler(100, prediction_type="score")
    sched = DPMSolverMultistepScheduler(100)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="expects timestep 99"):
        sched.step(torch.zeros(1), 98, torch.zeros(1))


class _GatedToy(torch.nn.Module):
    """Branch predictions that differ (uni 0.3 x, multi -0.2 x + 0.1) and a confidence that flips with the step."""

    gamma = 0.5
    latent_channels = 2

    def forward_all(self, x, t, use_uncertainty=True):
        z = x[:, :2]
        c = torch.full((x.shape[0],), 0.9 if (int(t[0]) // 7) % 2 else 0.1)
        return DAMMOutput(0.3 * z, -0.2 * z + 0.1, c.reshape(-1, 1, 1, 1), c, z)


@pytest.mark.parametrize("sampler", ["dpm_solver", "pndm"])
def test_the_solver_history_holds_the_gated_prediction(sampler):
    """The inferer's result equals a hand loop feeding the solver where(c >= gamma, eps_multi, eps_uni)."""
    toy = _GatedToy()
    net = SimpleNamespace(denoiser=toy)
    conds = [torch.zeros(2, 1, 3, 3)]
    inf = DAMMInferer(_training(), sampler=sampler, num_inference_steps=6, batch_size=None, progress=False, seed=4)
    res = inf.sample_latents(net, conds)
    gate = res["gate"]
    assert gate.shape == (2, 7 if sampler == "pndm" else 6) and gate.any() and not gate.all()
    assert torch.equal(res["choices"], gate)
    sched = inf.make_sampling_scheduler()
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(4))
    for i, t in enumerate(int(t) for t in sched.timesteps):
        out = toy.forward_all(x, torch.full((2,), t))
        eps = out.eps_multi if bool(gate[0, i]) else out.eps_uni
        x, _ = sched.step(eps, t, x)
    assert torch.allclose(res["latents"], x, atol=1e-6)
    # a branch forced for every step gives another result: the gate's choice reached the solver
    uni = inf.replace(branch="multi").sample_latents(net, conds)["latents"]
    assert not torch.allclose(uni, x, atol=1e-3)


@pytest.mark.parametrize(("sampler", "evaluations"), [("dpm_solver", 4), ("pndm", 5)])
def test_inferer_end_to_end_with_the_few_step_samplers(sampler, evaluations):
    from tests.test_damm_inferer import _model

    model = _model()
    x = torch.rand(2, 2, 8, 8) * 2 - 1
    inf = DAMMInferer(
        _training(), sampler=sampler, num_inference_steps=4, num_samples=2, batch_size=None, progress=False
    )
    out = inf.sample(x, model)
    assert out.prediction.shape == (2, 1, 8, 8) and torch.isfinite(out.prediction).all()
    assert out.gate_choices.shape == out.branch_choices.shape == (2, 2, evaluations)
    assert len(out.timesteps) == evaluations and out.settings["sampler"] == sampler and out.settings["eta"] is None
    assert torch.equal(inf.sample(x, model).prediction, out.prediction)  # deterministic from the seed
    assert describe_scheduler(inf)["sampler"] == type(inf.make_sampling_scheduler()).__name__
    assert inf.replace(num_inference_steps=3).sample(x, model).timesteps != out.timesteps


def test_unknown_sampler_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"sampler must be one of \('ddpm', 'ddim', 'pndm', 'dpm_solver'\)") as err:
        DAMMInferer(_training(), sampler="dpm", batch_size=None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="sampler"):
        make_sampling_scheduler("euler", _training(), 10)
    assert SAMPLERS == ("ddpm", "ddim", "pndm", "dpm_solver")
    assert isinstance(make_sampling_scheduler("ddim", _training(), 10), DDIMScheduler)

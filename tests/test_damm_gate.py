"""The DAMMP gate's training and decision (issue 14): labels, BCE options, calibration phase, per-sample decision."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import DataLoader
from monai.networks.schedulers import DDPMScheduler

from damm.engines import DAMMDiffusionTrainer
from damm.engines.diffusion_trainer import confidence_parameters, label_rate_buckets
from damm.evaluation import format_table
from damm.inferers import DAMMInferer, DAMMSampleOutput
from damm.losses import DAMMLoss
from damm.networks import DAMMDenoiser, DAMMOutput

KEYS = ["np_signal", "vessel", "nuclei"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _output(eps_uni: torch.Tensor, eps_multi: torch.Tensor, c: torch.Tensor) -> DAMMOutput:
    use_uni = (c < 0.5).reshape(-1, *([1] * (eps_uni.ndim - 1)))
    return DAMMOutput(eps_uni, eps_multi, c.reshape(-1, 1, 1, 1), c, torch.where(use_uni, eps_uni, eps_multi))


def _todays_loss(out: DAMMOutput, noise: torch.Tensor, phase_b: bool, w: torch.Tensor | None) -> torch.Tensor:
    """The loss as it was before the gate options (a verbatim copy of the formula)."""
    l_uni = (out.eps_uni.float() - noise.float()).abs().flatten(1).mean(dim=1)
    l_multi = (out.eps_multi.float() - noise.float()).abs().flatten(1).mean(dim=1)
    if w is not None:
        l_uni, l_multi = l_uni * w, l_multi * w
    c = out.confidence.float()
    label = (l_multi <= l_uni).detach().float()
    eps = torch.finfo(c.dtype).eps
    conf = 0.5 * F.binary_cross_entropy(c.clamp(eps, 1.0 - eps), label) + 1.0 * ((c - 0.5) ** 2).mean()
    if not phase_b:
        return 0.5 * (l_uni.mean() + l_multi.mean())
    return torch.where(c >= 0.5, 0.5 * (l_uni + l_multi), l_uni).mean() + 1e-4 * conf


@pytest.mark.parametrize("phase_b", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_paper_option_reproduces_todays_loss_exactly(phase_b, weighted):
    g = torch.Generator().manual_seed(3)
    eu, em, noise = (torch.randn(6, 2, 4, 4, generator=g) for _ in range(3))
    c0 = torch.rand(6, generator=g)
    w = torch.rand(6, generator=g) if weighted else None
    grads = []
    losses = []
    for fn in (
        lambda o: DAMMLoss(gate_training="paper")(o, noise, phase_b, w)[0],
        lambda o: _todays_loss(o, noise, phase_b, w),
    ):
        leaves = [t.clone().requires_grad_(True) for t in (eu, em, c0)]
        loss = fn(_output(*leaves))
        loss.backward()
        losses.append(loss.detach())
        grads.append([t.grad for t in leaves])
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(*grads):
        assert (a is None and b is None) or torch.equal(a, b)


def test_both_branches_learn_from_every_sample_under_gate_branch_loss_both():
    noise = torch.zeros(2, 1, 1, 1)
    eu = torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1)
    em = torch.tensor([3.0, 4.0]).reshape(2, 1, 1, 1).requires_grad_(True)
    c = torch.tensor([0.2, 0.8])  # sample 0 gated to uni, sample 1 to multi
    gated, _ = DAMMLoss(alpha=0.0)(_output(eu, em, c), noise, True)
    assert float(gated) == pytest.approx((1.0 + 0.5 * (2.0 + 4.0)) / 2)  # paper: l_uni on sample 0
    (grad,) = torch.autograd.grad(gated, em)
    assert grad.flatten().tolist() == [0.0, 0.25]  # the multi-modal branch learns nothing from sample 0
    both, _ = DAMMLoss(alpha=0.0, gate_branch_loss="both")(_output(eu, em, c), noise, True)
    assert float(both) == pytest.approx((0.5 * (1.0 + 3.0) + 0.5 * (2.0 + 4.0)) / 2)
    (grad,) = torch.autograd.grad(both, em)
    assert grad.flatten().tolist() == [0.25, 0.25]


def test_averaged_label_and_margin_hand_computed():
    l_uni, l_multi = torch.tensor([1.0, 0.3, 1.0]), torch.tensor([0.5, 1.0, 2.0])  # single-t label: 1, 0, 0
    extra = (torch.tensor([[0.2, 0.2], [1.5, 1.5], [4.0, 2.0]]), torch.tensor([[1.3, 1.3], [0.2, 0.2], [0.5, 0.5]]))
    label, mask = DAMMLoss(gate_training="paper").gate_label(l_uni, l_multi, extra)
    assert label.tolist() == [1.0, 0.0, 0.0] and mask is None  # "paper" ignores the extra timesteps
    # averaged over 3 timesteps: uni 0.4667 / 1.1 / 2.3333, multi 1.0333 / 0.4667 / 1.0 -> labels 0, 1, 1
    label, mask = DAMMLoss(gate_training="averaged").gate_label(l_uni, l_multi, extra)
    assert label.tolist() == [0.0, 1.0, 1.0] and mask is None
    # margin 0.1 of the mean: |1.0 - 0.95| = 0.05 < 0.0975 -> no label; |1 - 0.5| = 0.5 >= 0.075 -> labelled
    label, mask = DAMMLoss(gate_label_margin=0.1).gate_label(torch.tensor([1.0, 1.0]), torch.tensor([0.95, 0.5]))
    assert label.tolist() == [1.0, 1.0] and mask.tolist() == [False, True]


def _bce(c: float, y: float) -> float:
    return -(y * math.log(c) + (1 - y) * math.log(1 - c))


def test_masked_balanced_and_tempered_bce_hand_computed():
    c = torch.tensor([0.8, 0.6, 0.3, 0.4])
    y = torch.tensor([1.0, 1.0, 1.0, 0.0])
    pull = sum((v - 0.5) ** 2 for v in c.tolist()) / 4
    mask = torch.tensor([True, False, True, True])
    masked = (_bce(0.8, 1) + _bce(0.3, 1) + _bce(0.4, 0)) / 3
    got = DAMMLoss(gate_label_margin=0.1).confidence_loss(c, y, mask)
    assert float(got) == pytest.approx(0.5 * masked + pull, rel=1e-5)
    none = DAMMLoss(gate_label_margin=0.1).confidence_loss(c, y, torch.zeros(4, dtype=torch.bool))
    assert float(none) == pytest.approx(pull, rel=1e-5)  # no labelled sample: no BCE
    balanced = 0.5 * (_bce(0.8, 1) + _bce(0.6, 1) + _bce(0.3, 1)) / 3 + 0.5 * _bce(0.4, 0)
    assert float(DAMMLoss(gate_balance=True).confidence_loss(c, y)) == pytest.approx(0.5 * balanced + pull, rel=1e-5)
    one_class = DAMMLoss(gate_balance=True).confidence_loss(c[:3], y[:3])  # one class present: the plain mean
    assert float(one_class) == pytest.approx(float(DAMMLoss().confidence_loss(c[:3], y[:3])), rel=1e-6)
    # T = 0.5: sigmoid(2 logit(c)) = c^2 / (c^2 + (1 - c)^2)
    sharp = [v * v / (v * v + (1 - v) ** 2) for v in c.tolist()]
    tempered = sum(_bce(s, t) for s, t in zip(sharp, y.tolist())) / 4
    assert float(DAMMLoss(gate_temperature=0.5).confidence_loss(c, y)) == pytest.approx(0.5 * tempered + pull, rel=1e-5)


def test_gate_settings_are_checked():
    for bad in (
        {"gate_training": "mean"},
        {"gate_temperature": 0.0},
        {"gate_label_margin": -0.1},
        {"gate_branch_loss": "multi"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DAMMLoss(**bad)
    with pytest.raises(ValueError, match="gate_decision"):
        DAMMInferer(DDPMScheduler(10), gate_decision="first", batch_size=None)
    with pytest.raises(ValueError, match="gate_decision_steps"):
        DAMMInferer(DDPMScheduler(10), gate_decision_steps=0, batch_size=None)


def _trainer(loss, iterations=4, start=0, **kw):
    torch.manual_seed(0)
    den = DAMMDenoiser(latent_channels=2, channels=(8, 8, 8), num_res_blocks=1, norm_num_groups=4, time_embed_dim=16)
    sched = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.002, beta_end=0.02, clip_sample=False)
    data = [{k: torch.randn(2, 8, 8) for k in KEYS} | {"divergent": i % 2 == 0} for i in range(4 * iterations)]
    trainer = DAMMDiffusionTrainer(
        "cpu",
        1,
        DataLoader(data, batch_size=4, shuffle=False),
        den,
        torch.optim.AdamW(den.parameters(), lr=1e-2),
        loss,
        DAMMInferer(sched, batch_size=None),
        target_key="np_signal",
        condition_keys=["vessel", "nuclei"],
        divergence_aware_start_iteration=start,
        **kw,
    )
    return trainer, den


def test_calibration_phase_updates_only_the_confidence_path():
    trainer, den = _trainer(DAMMLoss(), iterations=4, gate_calibration_iterations=2, total_iterations=4)
    outs, states = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outs.append(dict(e.state.output)))
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: states.append({k: v.clone() for k, v in den.state_dict().items()})
    )
    trainer.run()
    assert [o["gate_calibration"] for o in outs] == [0.0, 0.0, 1.0, 1.0]
    assert outs[-1]["loss"] == pytest.approx(outs[-1]["loss_confidence"], rel=1e-6)  # the confidence term alone
    conf = {n for n, _ in confidence_parameters(den)}
    assert conf and all(n.startswith("uafm.confidence_head.") for n in conf)
    before, after = states[1], states[-1]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= conf  # every other weight and buffer is frozen
    assert any(not torch.equal(states[0][k], states[1][k]) for k in before if k not in conf)  # trained before


def test_averaged_label_draws_extra_timesteps_in_the_divergence_aware_phase():
    seen = []

    class Spy(DAMMLoss):
        def forward(self, *args, **kwargs):
            seen.append(kwargs.get("label_losses"))
            return super().forward(*args, **kwargs)

    trainer, _ = _trainer(Spy(gate_training="averaged"), iterations=3, start=1, gate_label_timesteps=3)
    outs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outs.append(dict(e.state.output)))
    trainer.run()
    assert seen[0] is None and all(s is not None and s[0].shape == s[1].shape == (4, 3) for s in seen[1:])
    keys = [k for _, _, k in label_rate_buckets(1000)]
    assert keys == ["label_rate_t0_250", "label_rate_t250_500", "label_rate_t500_750", "label_rate_t750_1000"]
    assert all(k in outs[-1] for k in [*keys, "label_divergence_agreement", "label_given_fraction"])
    with pytest.raises(ValueError, match="gate_label_timesteps"):
        _trainer(DAMMLoss(gate_training="averaged"), gate_label_timesteps=0)


def test_label_rates_per_timestep_bucket_accumulate_over_the_epoch():
    loss = DAMMLoss()
    trainer, _ = _trainer(loss)
    loss.last_label, loss.last_label_mask = torch.tensor([1.0, 0.0, 1.0, 0.0]), None
    out = trainer._label_diagnosis(torch.tensor([10, 300, 900, 910]), torch.tensor([False, True, True, False]))
    assert out["label_rate_t0_250"] == 1.0 and out["label_rate_t250_500"] == 0.0
    assert math.isnan(out["label_rate_t500_750"]) and out["label_rate_t750_1000"] == 0.5
    assert out["label_divergence_agreement"] == 0.5  # y = 1 on consistent, y = 0 on divergent agree
    loss.last_label_mask = torch.tensor([True, True, False, True])  # unlabelled samples do not count
    out = trainer._label_diagnosis(torch.tensor([600, 20, 700, 800]), None)
    assert out["label_rate_t0_250"] == 0.5 and out["label_rate_t500_750"] == 1.0
    assert out["label_rate_t750_1000"] == pytest.approx(1 / 3)


def test_training_confidence_is_split_by_subset():
    from damm.engines.diffusion_trainer import _confidence_by_subset

    c = torch.tensor([0.2, 0.4, 0.9, 0.7])
    out = _confidence_by_subset(c, torch.tensor([True, True, False, False]))
    assert out == {"confidence_mean_consistent": pytest.approx(0.8), "confidence_mean_divergent": pytest.approx(0.3)}
    only = _confidence_by_subset(c, [False] * 4)
    assert only["confidence_mean_consistent"] == pytest.approx(0.55) and math.isnan(only["confidence_mean_divergent"])
    assert _confidence_by_subset(c, None) == {} and _confidence_by_subset(None, [True] * 4) == {}


class _ToyDenoiser(torch.nn.Module):
    """Zero predictions and a known confidence per sample as a function of the timestep."""

    gamma = 0.5
    latent_channels = 1

    def __init__(self, table):
        super().__init__()
        self.table = table  # per sample: {t: c}

    def forward_all(self, x, t, use_uncertainty=True):
        c = torch.tensor([row[int(t[0])] for row in self.table])
        z = torch.zeros(x.shape[0], 1, *x.shape[2:])
        return DAMMOutput(z, z, c.reshape(-1, 1, 1, 1), c, z)


def test_per_step_and_per_sample_decisions_on_a_toy_denoiser():
    steps = list(range(900, -1, -100))  # DDIM-10 on T = 1000
    toy = _ToyDenoiser(
        [
            {t: 0.9 if t >= 500 else 0.1 for t in steps},  # confident early only
            {t: {900: 0.6, 800: 0.2, 700: 0.2}.get(t, 0.9) for t in steps},  # doubtful early, confident later
        ]
    )
    net = SimpleNamespace(denoiser=toy)
    conds = [torch.zeros(2, 1, 2, 2)]
    base = DAMMInferer(DDPMScheduler(1000), sampler="ddim", num_inference_steps=10, batch_size=None, progress=False)
    res = base.sample_latents(net, conds)
    assert res["timesteps"] == steps
    assert res["choices"][0].tolist() == [True] * 5 + [False] * 5  # the paper: c against gamma at every step
    assert res["choices"][1].tolist() == [True, False, False] + [True] * 7
    assert res["decision"].tolist() == [True, True]  # per step: at least half of the steps to multi
    res = base.replace(gate_decision="per_sample", gate_decision_steps=3).sample_latents(net, conds)
    assert res["choices"][0].tolist() == [True] * 10  # mean c over the first 3 steps 0.9
    # running means 0.6, 0.4, 0.333 -> multi, uni, uni; then the decision (uni) for the 7 later steps
    assert res["choices"][1].tolist() == [True] + [False] * 9
    assert res["decision"].tolist() == [True, False] and torch.equal(res["gate"], res["choices"])
    forced = base.replace(branch="multi", gate_decision="per_sample", gate_decision_steps=3).sample_latents(net, conds)
    assert forced["choices"].all() and forced["gate"][1].tolist() == [True] + [False] * 9
    assert base.replace(gate_decision="per_sample").settings()["gate_decision"] == "per_sample"


class _TwoBranchToy(_ToyDenoiser):
    """Known per-sample confidences; the uni branch predicts 1, the multi-modal branch 3 (every element)."""

    def forward_all(self, x, t, use_uncertainty=True):
        out = super().forward_all(x, t, use_uncertainty)
        ones = torch.ones(x.shape[0], 1, *x.shape[2:])
        return DAMMOutput(ones, 3 * ones, out.confidence_map, out.confidence, out.confidence_map)


def test_blend_decision_mixes_the_two_predictions_by_c():
    steps = list(range(900, -1, -100))
    toy = _TwoBranchToy([dict.fromkeys(steps, 0.75), dict.fromkeys(steps, 0.25)])
    net = SimpleNamespace(denoiser=toy)
    conds = [torch.zeros(2, 1, 2, 2)]
    base = DAMMInferer(DDPMScheduler(1000), sampler="ddim", num_inference_steps=10, batch_size=None, progress=False)
    seen = []
    blend = base.replace(gate_decision="blend")
    blend._step = lambda sched, eps, t, x, generator: seen.append(eps.clone()) or x  # record what the solver gets
    res = blend.sample_latents(net, conds)
    # c = 0.75: 0.75 * 3 + 0.25 * 1 = 2.5; c = 0.25: 0.25 * 3 + 0.75 * 1 = 1.5, at every step
    assert len(seen) == 10 and all(torch.allclose(e[0], torch.full_like(e[0], 2.5)) for e in seen)
    assert all(torch.allclose(e[1], torch.full_like(e[1], 1.5)) for e in seen)
    assert res["choices"][0].all() and not res["choices"][1].any()  # the branch with the larger weight
    assert res["decision"].tolist() == [True, False]
    hard = base.replace(gate_decision="per_step")
    hard_seen = []
    hard._step = lambda sched, eps, t, x, generator: hard_seen.append(eps.clone()) or x
    hard.sample_latents(net, conds)
    assert torch.allclose(hard_seen[0][0], torch.full_like(hard_seen[0][0], 3.0))  # per step: one branch only
    assert torch.allclose(hard_seen[0][1], torch.full_like(hard_seen[0][1], 1.0))


def test_per_sample_decisions_are_reported_per_input_and_per_subset():
    out = DAMMSampleOutput(
        prediction=torch.zeros(2, 1, 2, 2),
        std=torch.zeros(2, 1, 2, 2),
        samples=None,
        confidence_map=None,
        confidence=torch.full((2, 4, 3), 0.5),
        branch_choices=torch.ones(2, 4, 3, dtype=torch.bool),
        gate_choices=torch.ones(2, 4, 3, dtype=torch.bool),
        timesteps=[2, 1, 0],
        sample_choices=torch.tensor([[True, False, False, False], [True, True, True, False]]),
    )
    assert [s["multi_sample_fraction"] for s in out.statistics()] == [0.25, 0.75]
    rec = {"psnr": 20.0, "ssim": 0.5, "mae": 0.1}
    results = {
        "n_items": 4,
        "n_divergent": 2,
        "metric_space": "x",
        "methods": {
            "damm": {
                "consistent": rec,
                "divergent": rec,
                "seconds": 1.0,
                "gated_multi_fraction": {"consistent": 0.9, "divergent": 0.2},
                "multi_sample_fraction": {"consistent": 1.0, "divergent": 0.25},
            }
        },
    }
    table = format_table(results)
    assert "samples gated to multi (cons/div)" in table and "1.00 / 0.25" in table and "0.90 / 0.20" in table


def test_gate_benchmark_scores_hand_computed_runs():
    """benchmarks.damm_gate.run_statistics: AUROC, routing shares, direction and gated-minus-best on 4 tiles."""
    from benchmarks.damm_gate import _figures, run_statistics

    res = {
        "divergent": [True, True, False, False],
        "uni_psnr": [20.0, 22.0, 18.0, 18.0],
        "multi_psnr": [19.0, 21.0, 20.0, 22.0],
        "per_step": {
            "psnr": [20.0, 22.0, 20.0, 22.0],
            "confidence": [0.2, 0.6, 0.4, 0.9],  # 1 - c ranks divergent above consistent in 3 of 4 pairs
            "multi": [False, True, True, True],
            "multi_step_fraction": [0.0, 0.6, 0.5, 1.0],
        },
    }
    res["per_sample"] = res["blend"] = res["per_step"]
    s = run_statistics(res, "per_step")
    assert s["auroc"] == pytest.approx(0.75)
    assert s["divergent_to_uni"] == pytest.approx(50.0)
    assert s["consistent_to_multi"] == pytest.approx(100.0)
    assert s["routing_direction"] == pytest.approx(100.0 * (0.75 - 0.3))
    assert s["gated_minus_best_divergent"] == pytest.approx(21.0 - 21.0)  # uni mean 21 is the better branch
    assert s["gated_minus_best_consistent"] == pytest.approx(21.0 - 21.0)
    flipped = {**res, "per_step": {**res["per_step"], "multi_step_fraction": [1.0, 1.0, 0.0, 0.0]}}
    flipped["per_sample"] = flipped["blend"] = flipped["per_step"]
    jobs = [({"variant": "v", "seed": 0, "threads": 1}, res), ({"variant": "v", "seed": 0, "threads": 2}, flipped)]
    figs = {f["name"]: f["value"] for f in _figures(jobs, quick=True)}
    assert figs["v per_step: same routing direction on 1 and 2 threads, every seed"] == 0.0
    assert figs["v per_step 1 thr, mean of 1 seeds: AUROC of 1 - c for divergent tiles"] == pytest.approx(0.75)
    assert figs["v blend 1 thr, mean of 1 seeds: AUROC of 1 - c for divergent tiles"] == pytest.approx(0.75)
    cached = {k: v for k, v in res.items() if k != "blend"}  # a run evaluated before the blend decision existed
    names = [f["name"] for f in _figures([({"variant": "v", "seed": 0, "threads": 1}, cached)], quick=True)]
    assert names and not any(" blend " in n for n in names)


def test_mismatch_auxiliary_changes_only_the_chosen_samples_auxiliary_latents():
    from damm.losses import mismatch_auxiliary

    torch.manual_seed(0)
    anchor, aux = torch.randn(64, 2, 6, 6), torch.randn(64, 2, 6, 6)
    (a2, x2), mismatch = mismatch_auxiliary([anchor, aux], 0.5, generator=torch.Generator().manual_seed(1))
    assert a2 is anchor  # the anchor is never touched
    assert 10 < int(mismatch.sum()) < 54
    changed = (x2 != aux).flatten(1).any(dim=1)
    assert torch.equal(changed, mismatch)  # every chosen sample differs, no other one does
    for i in torch.nonzero(mismatch).flatten().tolist():  # each is a permutation of some sample's values
        assert any(torch.equal(x2[i].flatten().sort().values, aux[j].flatten().sort().values) for j in range(64))
    # seeded: reproducible
    (_, x3), m3 = mismatch_auxiliary([anchor, aux], 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m3, mismatch) and torch.equal(x3, x2)
    # a batch of one is shifted or flipped, never swapped with itself (no change)
    (_, one), m1 = mismatch_auxiliary([anchor[:1], aux[:1]], 0.999, generator=torch.Generator().manual_seed(0))
    assert bool(m1[0]) and not torch.equal(one, aux[:1])
    with pytest.raises(ValueError, match="gate_mismatch_fraction"):
        mismatch_auxiliary([anchor, aux], 1.0)
    with pytest.raises(ValueError, match="auxiliary"):
        mismatch_auxiliary([anchor], 0.5)


def test_correspondence_label_hand_computed():
    """Genuine pairs are labelled 1, mismatched ones 0; mismatched samples train the uni branch alone."""
    noise = torch.zeros(4, 1, 2, 2)
    eps_uni = torch.full((4, 1, 2, 2), 0.2)
    eps_multi = torch.full((4, 1, 2, 2), 0.6)  # multi worse everywhere: the paper's label would be 0 for all
    c = torch.tensor([0.9, 0.9, 0.2, 0.2])
    out = _output(eps_uni, eps_multi, c)
    mismatch = torch.tensor([False, True, False, True])
    loss_fn = DAMMLoss(gate_training="correspondence", gate_branch_loss="both")
    label, mask = loss_fn.gate_label(torch.full((4,), 0.2), torch.full((4,), 0.6), None, mismatch)
    assert label.tolist() == [1.0, 0.0, 1.0, 0.0] and mask is None
    loss, logs = loss_fn(out, noise, divergence_aware=True, mismatch=mismatch)
    per_sample = torch.tensor([0.4, 0.2, 0.4, 0.2])  # both: (0.2 + 0.6) / 2; mismatched: uni 0.2
    conf = loss_fn.confidence_loss(c, label)
    assert float(loss.detach()) == pytest.approx(float(per_sample.mean() + 1e-4 * conf), rel=1e-6)
    assert logs["label_rate"] == pytest.approx(0.5)
    # no mismatch given: every pair is genuine
    label, _ = loss_fn.gate_label(torch.ones(3), torch.ones(3))
    assert label.tolist() == [1.0, 1.0, 1.0]


def test_correspondence_training_mismatches_in_the_divergence_aware_phase_only():
    seen: list[torch.Tensor | None] = []
    loss = DAMMLoss(gate_training="correspondence", gate_branch_loss="both")
    original = loss.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mismatch"))
        return original(*args, **kwargs)

    loss.forward = spy  # type: ignore[method-assign]
    trainer, _ = _trainer(loss, iterations=6, start=2, gate_mismatch_fraction=0.5)
    trainer.run()
    assert seen[0] is None and seen[1] is None  # warm-up: genuine pairs only
    assert all(m is not None and m.shape == (4,) for m in seen[2:])
    assert sum(int(m.sum()) for m in seen[2:]) > 0  # some pairs were mismatched (4 x 4 samples at p = 0.5)
    with pytest.raises(ValueError, match="gate_mismatch_fraction"):
        _trainer(DAMMLoss(gate_training="correspondence"), gate_mismatch_fraction=0.0)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("damm", {"branch": "damm", "num_samples": 1}),
        ("uni_mean3", {"branch": "uni", "num_samples": 3}),
        ("damm_blend", {"branch": "damm", "num_samples": 1, "gate_decision": "blend"}),
        ("damm_per_sample_mean2", {"branch": "damm", "num_samples": 2, "gate_decision": "per_sample"}),
    ],
)
def test_evaluation_branch_names(name, expected):
    from damm.tasks.common import evaluation_branch, evaluation_methods

    assert evaluation_branch(name) == expected
    base = DAMMInferer(DDPMScheduler(1000), sampler="ddim", num_inference_steps=10, batch_size=None, progress=False)
    inferer = evaluation_methods(SimpleNamespace(), base, [name])[name].inferer
    assert inferer.branch == expected["branch"] and inferer.num_samples == expected["num_samples"]
    assert inferer.gate_decision == expected.get("gate_decision", "per_step")


@pytest.mark.parametrize("name", ["uni_blend", "damm_hard", "damm_mean0", "damm_meanx", "gated"])
def test_evaluation_branch_rejects_unknown_names(name):
    from damm.tasks.common import evaluation_branch

    with pytest.raises(ValueError, match=f"evaluation branch '{name}'"):
        evaluation_branch(name)

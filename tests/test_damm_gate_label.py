"""benchmarks.damm_gate_label: the label-information statistics on hand-computed errors, and the draws' plumbing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from benchmarks.damm_gate_label import label_information, label_statistics
from damm.networks import DAMMOutput

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_case() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """4 tiles (2 consistent, 2 divergent) x 4 draws, T = 8, draw k at t = 2k (quarter k)."""
    delta = np.array([[1, 1, 1, -1], [1, 1, -1, -1], [-1, -1, -1, 1], [-1, -1, -1, -1]], dtype=np.float64)
    l_multi = np.full((4, 4), 2.0)
    info = {
        "l_uni": l_multi + delta,
        "l_multi": l_multi,
        "confidence": np.repeat(np.array([[0.9], [0.3], [0.8], [0.2]]), 4, axis=1),
        "t": np.tile(np.array([0.0, 2.0, 4.0, 6.0]), (4, 1)),
    }
    return info, np.array([False, False, True, True])


def test_label_statistics_hand_computed() -> None:
    info, divergent = _hand_case()
    s = label_statistics(info, divergent, n_steps=8)
    assert s["label_rate_consistent"] == pytest.approx(62.5)
    assert s["label_rate_divergent"] == pytest.approx(12.5)
    for q, want in enumerate([100.0, 100.0, 50.0, 0.0]):
        assert s[f"label_rate_consistent_t{2 * q}_{2 * q + 2}"] == pytest.approx(want)
    for q, want in enumerate([0.0, 0.0, 0.0, 50.0]):
        assert s[f"label_rate_divergent_t{2 * q}_{2 * q + 2}"] == pytest.approx(want)
    assert s["label_divergence_agreement"] == pytest.approx(75.0)  # 3 + 2 + 3 + 4 of 16 labels
    assert s["auroc_one_label"] == pytest.approx((1 + 1 + 0.75 + 0.25) / 4)
    assert s["auroc_averaged_label"] == pytest.approx(1.0)  # mean deltas 0.5, 0, -0.5, -1
    assert s["sign_consistency"] == pytest.approx(0.5)  # |2p - 1| = 0.5, 0, 0.5, 1
    assert s["relative_delta_consistent"] == pytest.approx(100 * 0.25 / 2.125)
    assert s["relative_delta_divergent"] == pytest.approx(100 * -0.75 / 1.625)
    assert s["auroc_confidence"] == pytest.approx(0.75)  # 1 - c = 0.1, 0.7 | 0.2, 0.8


def test_label_statistics_coin_toss_has_no_information() -> None:
    """Labels independent of divergence: agreement near 50 %, averaged AUROC near 0.5."""
    rng = np.random.default_rng(0)
    n, k = 400, 32
    info = {
        "l_uni": rng.normal(1.0, 0.1, (n, k)),
        "l_multi": rng.normal(1.0, 0.1, (n, k)),
        "confidence": rng.uniform(size=(n, k)),
        "t": rng.integers(0, 1000, (n, k)).astype(float),
    }
    s = label_statistics(info, rng.uniform(size=n) < 0.3, n_steps=1000)
    assert abs(s["label_divergence_agreement"] - 50.0) < 3.0
    assert abs(s["auroc_averaged_label"] - 0.5) < 0.08
    assert s["sign_consistency"] < 0.25


def test_label_information_draws_are_stratified_and_use_the_branch_errors() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=8)
    n, c, s = 5, 2, 4
    images = {"np_signal": torch.randn(n, c, s, s), "vessel": torch.randn(n, c, s, s)}

    class _Inferer:
        def __init__(self) -> None:
            self.scheduler = scheduler

        def encode_conditions(self, model, xs):
            return [x.float() for x in xs]

        def noise_prediction(self, denoiser, z0, conds, noise, t, use_uncertainty=True):
            assert use_uncertainty
            conf = torch.full((z0.shape[0],), 0.25)
            return DAMMOutput(torch.zeros_like(noise), noise.clone(), conf.reshape(-1, 1, 1, 1), conf, noise)

    ae = SimpleNamespace(encode_scaled=lambda x: x)
    model = SimpleNamespace(
        target="np_signal",
        conditions=["vessel"],
        autoencoders={"np_signal": ae, "vessel": ae},
        denoiser=None,
        eval=lambda: None,
    )
    out = label_information(model, _Inferer(), images, draws=8, seed=3, batch=2)
    assert out["t"].shape == (n, 8)
    quarter = out["t"] // 2  # T = 8: quarters of 2 steps; draw k in quarter k % 4
    assert (quarter == np.tile(np.arange(8) % 4, (n, 1))).all()
    assert (out["l_multi"] == 0).all() and (out["l_uni"] > 0).all()  # uni error = mean |noise|
    assert np.allclose(out["confidence"], 0.25)
    again = label_information(model, _Inferer(), images, draws=8, seed=3, batch=2)  # seeded: reproducible
    assert np.array_equal(out["t"], again["t"]) and np.array_equal(out["l_uni"], again["l_uni"])

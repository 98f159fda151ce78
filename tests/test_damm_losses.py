"""Tests of the two-phase DAMM loss: hand-computed values, gradient routing, batched == per-sample reference."""

from __future__ import annotations

import pytest
import torch

from damm.losses import DAMMLoss, per_sample_reference_loss
from damm.networks import DAMMDenoiser, DAMMOutput


def _output(eps_uni: torch.Tensor, eps_multi: torch.Tensor, confidence: torch.Tensor, gamma: float) -> DAMMOutput:
    use_uni = (confidence < gamma).reshape(-1, *([1] * (eps_uni.ndim - 1)))
    return DAMMOutput(
        eps_uni=eps_uni,
        eps_multi=eps_multi,
        confidence_map=confidence.reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2),
        confidence=confidence,
        eps=torch.where(use_uni, eps_uni, eps_multi),
    )


def _hand_case() -> tuple[DAMMOutput, torch.Tensor]:
    # 3 samples, 1 x 1 x 2 predictions, noise = 0, so per-sample L1 is the mean of |eps|
    noise = torch.zeros(3, 1, 1, 2)
    eps_uni = torch.tensor([[1.0, 1.0], [0.2, 0.4], [2.0, 0.0]]).reshape(3, 1, 1, 2)  # l_uni = 1.0, 0.3, 1.0
    eps_multi = torch.tensor([[0.5, 0.5], [1.0, 1.0], [3.0, 1.0]]).reshape(3, 1, 1, 2)  # l_multi = 0.5, 1.0, 2.0
    confidence = torch.tensor([0.8, 0.3, 0.6])  # gate: multi, uni, multi
    return _output(eps_uni, eps_multi, confidence, 0.5), noise


def test_warmup_loss_hand_computed() -> None:
    out, noise = _hand_case()
    loss, logs = DAMMLoss()(out, noise, divergence_aware=False)
    # 1/2 (mean(1.0, 0.3, 1.0) + mean(0.5, 1.0, 2.0)) = 1/2 (0.76667 + 1.16667)
    assert loss.item() == pytest.approx(0.5 * (2.3 / 3 + 3.5 / 3), abs=1e-6)
    assert logs["loss_uni"] == pytest.approx(2.3 / 3, abs=1e-6)
    assert logs["loss_multi"] == pytest.approx(3.5 / 3, abs=1e-6)


def test_divergence_aware_loss_hand_computed() -> None:
    out, noise = _hand_case()
    loss_fn = DAMMLoss(gamma=0.5, alpha=0.1, bce_weight=0.5, pull_weight=1.0)
    loss, logs = loss_fn(out, noise, divergence_aware=True)
    # labels y = [l_multi <= l_uni] = [1, 0, 0]; gate multi for samples 0 and 2
    denoise = (0.5 * (1.0 + 0.5) + 0.3 + 0.5 * (1.0 + 2.0)) / 3
    c = torch.tensor([0.8, 0.3, 0.6], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    bce = -(y * c.log() + (1 - y) * (1 - c).log()).mean()
    pull = ((c - 0.5) ** 2).mean()
    conf = float(0.5 * bce + pull)
    assert loss.item() == pytest.approx(denoise + 0.1 * conf, abs=1e-6)
    assert logs["loss_confidence"] == pytest.approx(conf, abs=1e-6)
    assert logs["label_rate"] == pytest.approx(1 / 3)
    assert logs["gated_multi_fraction"] == pytest.approx(2 / 3)
    assert logs["confidence_mean"] == pytest.approx(1.7 / 3, abs=1e-6)
    expected_keys = {"loss_uni", "loss_multi", "confidence_mean", "label_rate", "gated_multi_fraction"}
    assert expected_keys | {"loss_confidence"} <= set(logs)


def test_gradient_routing_hand_computed() -> None:
    out, noise = _hand_case()
    for name in ("eps_uni", "eps_multi", "confidence"):
        getattr(out, name).requires_grad_(True)
    alpha = 0.1
    loss, _ = DAMMLoss(gamma=0.5, alpha=alpha)(out, noise, divergence_aware=True)
    g_uni, g_multi, g_c = torch.autograd.grad(loss, [out.eps_uni, out.eps_multi, out.confidence])
    # multi branch: no gradient from sample 1 (gated to uni); 0.5 / (B * numel) * sign elsewhere
    assert torch.count_nonzero(g_multi[1]) == 0
    torch.testing.assert_close(g_multi[0], torch.full((1, 1, 2), 0.5 / 6))
    torch.testing.assert_close(g_multi[2], torch.full((1, 1, 2), 0.5 / 6))
    # uni branch always gets a gradient: 1/(B*numel) for uni-gated samples, half of it for multi-gated ones
    torch.testing.assert_close(g_uni[1], torch.full((1, 1, 2), 1.0 / 6))
    torch.testing.assert_close(g_uni[0], torch.full((1, 1, 2), 0.5 / 6))
    torch.testing.assert_close(g_uni[2, 0, 0, 1], torch.tensor(0.0))  # |0| has zero subgradient
    # the label carries no gradient: dL/dc comes from the confidence term alone
    c = torch.tensor([0.8, 0.3, 0.6])
    y = torch.tensor([1.0, 0.0, 0.0])
    expected = alpha * (0.5 * (c - y) / (c * (1 - c)) / 3 + 2 * (c - 0.5) / 3)
    torch.testing.assert_close(g_c, expected)


def test_warmup_ignores_confidence() -> None:
    out, noise = _hand_case()
    out.confidence.requires_grad_(True)
    out.eps_uni.requires_grad_(True)
    loss, _ = DAMMLoss()(out, noise, divergence_aware=False)
    (g,) = torch.autograd.grad(loss, [out.confidence], allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0


def _model() -> DAMMDenoiser:
    torch.manual_seed(0)
    model = DAMMDenoiser(
        latent_channels=2,
        num_auxiliary=2,
        channels=(8, 8, 16, 16),
        norm_num_groups=4,
        time_embed_dim=32,
        num_res_blocks=1,
    )
    for head in (model.uni.out[-1], model.multi.out[-1]):
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("divergence_aware", [False, True])
def test_batched_loss_equals_per_sample_reference(divergence_aware: bool) -> None:
    model = _model()
    x = torch.randn(6, 8, 16, 16)
    t = torch.randint(0, 1000, (6,))
    noise = torch.randn(6, 2, 16, 16)
    conf = model.forward_all(x, t).confidence.detach()
    gamma = float(conf.sort().values[2:4].mean())
    model.gamma = gamma
    loss_fn = DAMMLoss(gamma=gamma, alpha=0.5)  # large alpha so the confidence term shows in the gradients
    loss, logs = loss_fn(model.forward_all(x, t, use_uncertainty=divergence_aware), noise, divergence_aware)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref = per_sample_reference_loss(model, x, t, noise, loss_fn, divergence_aware)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    if divergence_aware:
        assert logs["gated_multi_fraction"] == pytest.approx(0.5)
    for g, rg in zip(grads, ref_grads):
        if g is None or rg is None:
            assert (g is None or torch.count_nonzero(g) == 0) and (rg is None or torch.count_nonzero(rg) == 0)
        else:
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


def test_multi_branch_gets_no_eps_gradient_from_uni_gated_samples() -> None:
    model = _model()
    x = torch.randn(4, 8, 16, 16)
    t = torch.randint(0, 1000, (4,))
    noise = torch.randn(4, 2, 16, 16)
    loss_fn = DAMMLoss(gamma=0.999, alpha=0.0)  # every sample gated to the uni-modal branch
    model.gamma = 0.999
    out = model.forward_all(x, t)
    assert bool((out.confidence < 0.999).all())
    loss, logs = loss_fn(out, noise, divergence_aware=True)
    loss.backward()
    assert logs["gated_multi_fraction"] == 0.0
    multi_only = list(model.multi.middle.parameters()) + list(model.multi.decoder.parameters())
    multi_only += list(model.multi.out.parameters())
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in multi_only)
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.uni.decoder.parameters())


def test_bad_arguments() -> None:
    out, _ = _hand_case()
    with pytest.raises(ValueError, match="noise shape"):
        DAMMLoss()(out, torch.zeros(3, 1, 2, 2), divergence_aware=True)
    with pytest.raises(ValueError, match="gamma must lie in"):
        DAMMLoss(gamma=1.5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        DAMMLoss(alpha=-1.0)

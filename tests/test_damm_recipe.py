"""The training recipe's levers: iteration budgets, the divergence-aware phase at a fraction, the EMA of the
denoiser (the weights sampled, saved and restored), the shared autoencoder, min-SNR-gamma and v-prediction, and
the thread setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from damm.engines.budget import IterationBudget, epochs_for, fraction_of
from damm.engines.ema import Snapshots, WeightEMA, ema_decay_at
from damm.losses import DAMMLoss, diffusion_target, min_snr_weights
from damm.model import build_autoencoders, compute_scale_factors, export_model, export_snapshot, snapshot_path
from damm.networks.denoiser import DAMMOutput
from ddcore.device import physical_cores, set_num_threads

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


# ---------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize(("iterations", "per_epoch", "epochs"), [(6, 4, 2), (8, 4, 2), (1, 4, 1), (9, 3, 3)])
def test_epochs_for(iterations, per_epoch, epochs):
    assert epochs_for(iterations, list(range(per_epoch))) == epochs
    assert epochs_for(iterations, per_epoch) == epochs


def test_bad_budgets_name_the_setting():
    with pytest.raises(ValueError, match="iteration budget must be >= 1"):
        epochs_for(0, 4)
    with pytest.raises(ValueError, match="no batch"):
        epochs_for(5, [])
    with pytest.raises(ValueError, match="dm_divergence_aware_start_fraction"):
        fraction_of(1.5, 100, "dm_divergence_aware_start_fraction")


@pytest.mark.parametrize("budget", [6, 8, 3])
def test_iteration_budget_stops_exactly_and_closes_the_epoch(budget):
    data = list(range(4))
    seen: list[int] = []
    epochs: list[int] = []
    engine = Engine(lambda e, b: seen.append(e.state.iteration))
    IterationBudget(budget).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.iteration))
    engine.run(data, max_epochs=epochs_for(budget, data))
    assert engine.state.iteration == budget
    assert seen == list(range(1, budget + 1))
    assert epochs[-1] == budget  # the partial last epoch completes: its checkpoint is written


def test_divergence_aware_phase_starts_at_its_fraction():
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "train.json")])
    parser["dm_iterations"] = 200
    parser["dm_divergence_aware_start_fraction"] = 0.25
    assert parser.get_parsed_content("dm_divergence_aware_start_iteration") == 50
    # the shipped main job keeps its previous schedule: 1080 iterations, the phase switch at iteration 400
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "train.json")])
    assert parser.get_parsed_content("dm_divergence_aware_start_iteration") == 400


def test_task_overlays_have_iteration_budgets_only():
    for overlay in ("task_brats.json", "task_microscopy.json"):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / "train.json"), str(CONFIGS / overlay)])
        config = parser.get()
        assert "ae_epochs" not in config and "dm_epochs" not in config
        assert config["ae_time_budget_s"] is None and config["dm_time_budget_s"] is None  # a cap, never the default
        start = parser.get_parsed_content("dm_divergence_aware_start_iteration")
        assert 0 < start < config["dm_iterations"]  # the phase switch is reached within the budget


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_decay_warm_up():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.9, 10**6) == 0.9


def test_ema_update_values_hand_computed():
    net = nn.Linear(1, 1, bias=False)
    ema = WeightEMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(2.0)
    ema.update()  # first update copies
    assert float(ema.averaged.module.weight) == pytest.approx(2.0)
    with torch.no_grad():
        net.weight.fill_(4.0)
    ema.update()  # n=1: decay min(0.5, 2/11) = 2/11
    d = 2 / 11
    assert float(ema.averaged.module.weight) == pytest.approx(2.0 * d + 4.0 * (1 - d))
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema.update()  # n=2: decay min(0.5, 3/12) = 0.25
    assert float(ema.averaged.module.weight) == pytest.approx((2.0 * d + 4.0 * (1 - d)) * 0.25)
    assert ema.num_updates == 3


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.autoencoders = nn.ModuleDict({"a": nn.Linear(2, 2)})
        self.denoiser = nn.Linear(2, 2)


def test_exported_model_carries_the_ema_weights_and_they_reload(tmp_path):
    torch.manual_seed(0)
    model = _Holder()
    ema = WeightEMA(model.denoiser, decay=0.9)
    ema.update()
    with torch.no_grad():
        model.denoiser.weight.add_(1.0)
    ema.update()
    averaged = ema.averaged.module.weight.detach().clone()
    raw = model.denoiser.weight.detach().clone()
    assert not torch.allclose(averaged, raw)
    snap = export_snapshot(model, tmp_path / "model.pt", 7, ema)
    assert snap == snapshot_path(tmp_path / "model.pt", 7) == tmp_path / "model_iteration=7.pt"
    assert torch.allclose(model.denoiser.weight, raw)  # a snapshot leaves the training weights alone
    assert torch.allclose(torch.load(snap, weights_only=True)["denoiser.weight"], averaged)
    export_model(model, tmp_path / "model.pt", ema=ema)
    assert torch.allclose(model.denoiser.weight, averaged)  # what this process samples with next
    fresh = _Holder()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert torch.allclose(fresh.denoiser.weight, averaged)


def test_ema_state_survives_a_checkpoint_round_trip():
    net = nn.Linear(3, 1)
    ema = WeightEMA(net, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            net.weight.mul_(0.5)
        ema.update()
    state = ema.averaged.state_dict()
    other = WeightEMA(nn.Linear(3, 1), decay=0.99)
    other.averaged.load_state_dict(state)
    assert other.num_updates == 3
    assert torch.allclose(other.averaged.module.weight, ema.averaged.module.weight)


def test_ema_disabled_exports_the_raw_weights(tmp_path):
    model = _Holder()
    ema = WeightEMA(model.denoiser, decay=0.0)
    engine = Engine(lambda e, b: None)
    ema.attach(engine)
    engine.run([0, 1], max_epochs=1)
    assert ema.num_updates == 0 and not ema.copy_to()
    raw = model.denoiser.weight.detach().clone()
    export_model(model, tmp_path / "m.pt", ema=ema)
    assert torch.allclose(torch.load(tmp_path / "m.pt", weights_only=True)["denoiser.weight"], raw)


def test_bad_ema_decay():
    with pytest.raises(ValueError, match="dm_ema_decay"):
        WeightEMA(nn.Linear(1, 1), decay=1.0)


def test_snapshots_write_at_their_iterations():
    written: list[int] = []
    engine = Engine(lambda e, b: None)
    Snapshots([2, 5, 0], written.append).attach(engine)
    engine.run(list(range(3)), max_epochs=2)
    assert written == [2, 5]


# ---------------------------------------------------------------------------------------------- shared AE
def _tiny_ae_kwargs() -> dict:
    return {"spatial_dims": 2, "in_channels": 1, "channels": [8, 8], "latent_channels": 2, "num_res_blocks": 1,
            "norm_num_groups": 4}  # fmt: skip


def test_shared_autoencoder_is_one_module_and_round_trips(tmp_path):
    shared = build_autoencoders(["x", "y", "z"], shared=True, **_tiny_ae_kwargs())
    assert shared["x"] is shared["y"] is shared["z"]
    per_modality = build_autoencoders(["x", "y", "z"], **_tiny_ae_kwargs())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert 3 * n_shared == sum(p.numel() for p in per_modality.parameters())
    torch.save(shared.state_dict(), tmp_path / "ae.pt")
    again = build_autoencoders(["x", "y", "z"], shared=True, **_tiny_ae_kwargs())
    again.load_state_dict(torch.load(tmp_path / "ae.pt", weights_only=True))
    img = torch.rand(1, 1, 16, 16)
    shared.eval(), again.eval()
    with torch.no_grad():
        assert torch.allclose(shared["y"].encode_scaled(img), again["z"].encode_scaled(img))


def test_shared_autoencoder_scale_factor_pools_the_modalities():
    torch.manual_seed(0)
    shared = build_autoencoders(["x", "y"], shared=True, **_tiny_ae_kwargs())
    batches = [{"x": torch.rand(2, 1, 16, 16), "y": 3.0 * torch.rand(2, 1, 16, 16)}]
    from damm.networks import compute_scale_factor

    fx = float(compute_scale_factor(shared["x"], batches, key="x"))
    fy = float(compute_scale_factor(shared["y"], batches, key="y"))
    factors = compute_scale_factors(shared, batches)
    pooled = (2.0 / (1.0 / fx**2 + 1.0 / fy**2)) ** 0.5
    assert factors == {"x": pytest.approx(pooled), "y": pytest.approx(pooled)}
    assert float(shared["x"].scale_factor) == pytest.approx(pooled)
    # one autoencoder per modality keeps its own factor
    separate = build_autoencoders(["x", "y"], **_tiny_ae_kwargs())
    f = compute_scale_factors(separate, batches)
    assert f["x"] == pytest.approx(float(compute_scale_factor(separate["x"], batches, key="x")))


# ---------------------------------------------------------------------------------------------- loss options
def _scheduler(kind: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=100, schedule="scaled_linear_beta", prediction_type=kind)


def test_min_snr_weights_hand_computed():
    sch = _scheduler()
    t = torch.tensor([0, 50, 99])
    abar = sch.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    assert torch.allclose(min_snr_weights(sch, t, 5.0).double(), expected, atol=1e-6)
    assert float(min_snr_weights(sch, t, 5.0)[0]) < 1.0 and float(min_snr_weights(sch, t, 5.0)[-1]) == pytest.approx(1)
    v = _scheduler("v_prediction")
    assert torch.allclose(min_snr_weights(v, t, 5.0).double(), expected * snr / (snr + 1), atol=1e-6)
    with pytest.raises(ValueError, match="dm_min_snr_gamma"):
        min_snr_weights(sch, t, 0.0)


def test_diffusion_target_follows_the_prediction_type():
    z0, eps, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([10, 80])
    assert diffusion_target(_scheduler(), z0, eps, t) is eps
    v = diffusion_target(_scheduler("v_prediction"), z0, eps, t)
    abar = _scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * z0, atol=1e-6)


def test_loss_weights_scale_the_branch_losses_only_when_given():
    out = DAMMOutput(
        eps=torch.zeros(2, 1, 2, 2),
        eps_uni=torch.ones(2, 1, 2, 2),
        eps_multi=torch.full((2, 1, 2, 2), 2.0),
        confidence=torch.tensor([0.8, 0.2]),
        confidence_map=torch.zeros(2, 1, 2, 2),
    )
    loss_fn = DAMMLoss(gamma=0.5, alpha=0.0)
    noise = torch.zeros(2, 1, 2, 2)
    plain, _ = loss_fn(out, noise, divergence_aware=False)
    assert float(plain) == pytest.approx(0.5 * (1.0 + 2.0))  # the paper's loss, unchanged
    weighted, _ = loss_fn(out, noise, divergence_aware=False, weights=torch.tensor([1.0, 0.0]))
    assert float(weighted) == pytest.approx(0.5 * (0.5 + 1.0))
    gated, _ = loss_fn(out, noise, divergence_aware=True, weights=torch.tensor([2.0, 1.0]))
    assert float(gated) == pytest.approx((2.0 * 1.5 + 1.0 * 1.0) / 2)  # sample 0 to multi, sample 1 to uni


# ---------------------------------------------------------------------------------------------- threads
def test_num_threads_setting():
    before = torch.get_num_threads()
    try:
        assert set_num_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_num_threads(0) == 1  # 0 keeps what is set (OMP_NUM_THREADS, a caller's pin, else the cores)
        assert physical_cores() >= 1
        with pytest.raises(ValueError, match="num_threads"):
            set_num_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_every_config_sets_the_threads():
    import json

    for name in ("train.json", "inference.json", "task_brats.json", "task_microscopy.json", "drdm_common.json",
                 "multi_gpu_train.json"):  # fmt: skip
        config = json.loads((CONFIGS / name).read_text())
        assert "$ddcore.device.set_num_threads(@num_threads)" in config["initialize"], name
    assert json.loads((CONFIGS / "common.json").read_text())["num_threads"] == 0
    assert json.loads((CONFIGS / "drdm_common.json").read_text())["num_threads"] == 0

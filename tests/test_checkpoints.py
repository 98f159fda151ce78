"""The one checkpoint stack of DAMM and DRDM (ddcore.checkpoints): names, discovery, pruning, fallback, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from torch import nn

from ddcore.checkpoints import (
    AtomicCheckpointSaver,
    ResumeFromCheckpoint,
    checkpoint_filename,
    latest_checkpoint,
    list_checkpoints,
    load_checked_state_dict,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
)

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
LEFTOVER = ".checkpoint_epoch=3.0123456789abcdef.tmp.pt"  # what a kill during atomic_torch_save leaves


pytestmark = pytest.mark.usefixtures("one_thread")


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def _engine(model: nn.Module, fail_at_epoch: int | None = None) -> Engine:
    """An ignite engine adding 1 to the weights every iteration (2 iterations per epoch)."""

    def step(engine: Engine, batch: int) -> None:
        if fail_at_epoch is not None and engine.state.epoch == fail_at_epoch:
            raise RuntimeError("killed")
        with torch.no_grad():
            model.weight += 1.0

    return Engine(step)


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def test_checkpoint_filename_is_the_ignite_name():
    assert checkpoint_filename(3) == "checkpoint_epoch=3.pt"
    assert checkpoint_filename(12, "ae", "iteration") == "ae_checkpoint_iteration=12.pt"
    with pytest.raises(ValueError, match="unit"):
        checkpoint_filename(1, unit="step")


def test_latest_checkpoint_ignores_temporaries_and_other_names(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None and list_checkpoints(tmp_path / "missing") == []
    _touch(tmp_path, "checkpoint_epoch=2.pt", "checkpoint_epoch=10.pt", "checkpoint_epoch=9.pt", LEFTOVER)
    _touch(tmp_path, "model.pt", "checkpoint_final_iteration=99.pt", "checkpoint_epoch=50.pt.bak", "checkpoint_50.pt")
    _touch(tmp_path, "ae_checkpoint_epoch=70.pt", ".checkpoint_epoch=80.fedcba9876543210.tmp.pt")
    (tmp_path / "checkpoint_epoch=90.pt").mkdir()  # a folder is not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint_epoch=10.pt",
        "checkpoint_epoch=9.pt",
        "checkpoint_epoch=2.pt",
    ]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=10.pt"  # numeric, not lexicographic
    assert latest_checkpoint(tmp_path, "ae") == tmp_path / "ae_checkpoint_epoch=70.pt"
    only = tmp_path / "only_leftover"
    _touch(only, LEFTOVER)
    assert latest_checkpoint(only) is None and load_latest_checkpoint(only) is None


def test_truncated_newest_falls_back_to_previous_with_warning(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "checkpoint_epoch=1.pt")
    torch.save({"model": {"w": torch.full((2,), 2.0)}}, tmp_path / "checkpoint_epoch=2.pt")
    whole = (tmp_path / "checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(whole[: len(whole) // 2])  # a truncated copy
    _touch(tmp_path, LEFTOVER)
    with pytest.warns(RuntimeWarning, match=r"checkpoint_epoch=2\.pt cannot be read.*trying the previous one"):
        path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "checkpoint_epoch=1.pt" and torch.equal(state["model"]["w"], torch.ones(2))
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(b"")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=r"no checkpoint of .* can be read"):
        load_latest_checkpoint(tmp_path)


def test_resume_skips_truncated_checkpoint_and_restores_the_previous(tmp_path):
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = _engine(model)
    AtomicCheckpointSaver(tmp_path, {"model": model, "optimizer": opt}, save_interval=1, n_saved=3).attach(engine)
    saved = {}
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saved.update({e.state.epoch: model.weight.clone()}))
    engine.run([0, 1], max_epochs=2)
    path = tmp_path / "checkpoint_epoch=2.pt"
    path.write_bytes(path.read_bytes()[:100])
    fresh = _linear(seed=1)
    engine2 = _engine(fresh)
    resume = ResumeFromCheckpoint(tmp_path, {"model": fresh, "optimizer": torch.optim.SGD(fresh.parameters(), lr=0.1)})
    resume.attach(engine2)
    started = []
    engine2.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    with pytest.warns(RuntimeWarning, match=r"checkpoint_epoch=2\.pt"):
        engine2.run([0, 1], max_epochs=3)
    assert resume.resumed_from == tmp_path / "checkpoint_epoch=1.pt"
    assert started == [2, 3] and engine2.state.iteration == 6
    assert torch.equal(fresh.weight, saved[1] + 4.0)  # epoch 1's weights, then 4 more iterations


def test_prune_keeps_the_newest_n_including_earlier_runs(tmp_path):
    names = [checkpoint_filename(n) for n in range(1, 6)]
    _touch(tmp_path, *names, "checkpoint_iteration=40.pt", "ae_checkpoint_epoch=1.pt", "model.pt", LEFTOVER)
    removed = prune_checkpoints(tmp_path, 2, keep="checkpoint_epoch=3.pt")  # a new run just wrote epoch 3
    assert sorted(p.name for p in removed) == sorted(names[:1] + names[3:])  # 1 is old; 4, 5 a stale longer run
    assert {p.name for p in list_checkpoints(tmp_path)} == {"checkpoint_epoch=3.pt", "checkpoint_epoch=2.pt"} | {
        "checkpoint_iteration=40.pt"  # another unit is left alone
    }
    assert (tmp_path / "ae_checkpoint_epoch=1.pt").exists() and (tmp_path / "model.pt").exists()
    with pytest.raises(ValueError, match="n_saved"):
        prune_checkpoints(tmp_path, 0)


def test_saver_prunes_folder_clears_leftovers_and_exports_final_weights(tmp_path):
    _touch(tmp_path, "checkpoint_epoch=7.pt", "checkpoint_epoch=8.pt", LEFTOVER)  # an earlier, longer run
    model = _linear()
    engine = _engine(model)
    saver = AtomicCheckpointSaver(tmp_path, {"model": model}, save_interval=1, n_saved=2, final_filename="model.pt")
    saver.attach(engine)
    assert not (tmp_path / LEFTOVER).exists()  # stale temporaries are removed when the saver is attached
    engine.run([0, 1], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt", "model.pt"]
    state = torch.load(tmp_path / "checkpoint_epoch=3.pt", weights_only=True)
    assert set(state) == {"model", "trainer"} and state["trainer"]["iteration"] == 6
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(final) == {"weight", "bias"} and torch.equal(final["weight"], model.weight)  # plain state dict


def test_saver_writes_no_final_file_when_the_run_fails(tmp_path):
    model = _linear()
    engine = _engine(model, fail_at_epoch=2)
    AtomicCheckpointSaver(tmp_path, {"model": model}, save_interval=1, final_filename="model.pt").attach(engine)
    with pytest.raises(RuntimeError, match="killed"):
        engine.run([0, 1], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]


def test_saver_argument_errors(tmp_path):
    model = _linear()
    with pytest.raises(ValueError, match="save_final"):
        AtomicCheckpointSaver(tmp_path, {"model": model}, save_final=True)
    saver = AtomicCheckpointSaver(tmp_path, {"net": model}, save_interval=1, final_filename="model.pt")
    with pytest.raises(KeyError, match=r"final_filename='model\.pt' exports save_dict\['model'\]"):
        saver.attach(_engine(model))


def test_weights_round_trip_with_weights_only(tmp_path):
    model = _linear()
    engine = _engine(model)
    AtomicCheckpointSaver(tmp_path, {"model": model}, save_interval=1, final_filename="model.pt").attach(engine)
    engine.run([0], max_epochs=1)
    for name in ("checkpoint_epoch=1.pt", "model.pt"):  # multi-object checkpoint and plain export
        other = _linear(seed=3)
        assert not torch.equal(other.weight, model.weight)
        load_checked_state_dict(other, tmp_path / name, "linear", key="model")
        assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
    with pytest.raises(ValueError, match=r"model\.pt' does not match the configured linear.*\(2, 3\) vs configured"):
        load_checked_state_dict(nn.Linear(4, 2), tmp_path / "model.pt", "linear")
    with pytest.raises(FileNotFoundError, match="Checkpoint for the linear not found"):
        load_checked_state_dict(model, tmp_path / "nothing.pt", "linear")
    torch.save({"model": Path("x")}, tmp_path / "pickled.pt")  # not a tensor dict: weights_only refuses it
    with pytest.raises(ValueError, match=r"pickled\.pt cannot be read"):
        load_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing.pt")


def test_damm_and_drdm_write_the_same_names(tmp_path):
    """Both methods' trainers and configs use the one saver, so both folders hold the same names."""
    from damm.engines import AutoencoderTrainer
    from damm.model import build_autoencoders
    from drdm.diffusion import DeformationDiffusion
    from drdm.networks import RecoveryNet
    from drdm.trainer import DRDMTrainer

    torch.manual_seed(0)
    keys = ["np_signal", "vessel"]
    aes = build_autoencoders(keys, spatial_dims=2, channels=(8, 8), latent_channels=2, norm_num_groups=4)
    data = [{k: torch.rand(1, 16, 16) * 2 - 1 for k in keys} for _ in range(2)]
    opt = torch.optim.Adam(aes.parameters(), lr=1e-3)
    damm = AutoencoderTrainer("cpu", 1, DataLoader(data, batch_size=2), autoencoders=aes, g_optimizer=opt)
    AtomicCheckpointSaver(tmp_path / "damm", {"autoencoders": aes, "g_optimizer": opt}, save_interval=1).attach(damm)
    damm.run()
    net = RecoveryNet(spatial_dims=2, in_channels=1, channels=(2, 4), embed_dim=8)
    diffusion = DeformationDiffusion(num_timesteps=4, control_size=8, levels=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = DataLoader([{"image": torch.rand(1, 16, 16)} for _ in range(2)], batch_size=2)
    drdm = DRDMTrainer("cpu", 1, loader, net, opt, diffusion)
    AtomicCheckpointSaver(tmp_path / "drdm", {"model": net, "optimizer": opt}, save_interval=1).attach(drdm)
    drdm.run()
    expected = [checkpoint_filename(1)]
    names = {method: [p.name for p in (tmp_path / method).iterdir()] for method in ("damm", "drdm")}
    assert names["damm"] == names["drdm"] == expected
    for config in ("train.json", "drdm_train.json"):
        text = json.dumps(json.loads((CONFIGS / config).read_text()))
        assert '"_target_": "ddcore.checkpoints.AtomicCheckpointSaver"' in text


# ---------------------------------------------------------------- exact resume (ddcore.seeding)
def _noisy_trainer(model: nn.Module, root: Path, seed: int, max_epochs: int, kill_at_epoch: int | None = None):
    """SGD on a shuffled loader with noise drawn from the global generators: order and noise both matter."""
    import random

    import numpy as np

    data = [torch.tensor([float(i)]) for i in range(8)]
    loader = DataLoader(data, batch_size=2, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(engine, batch):
        opt.zero_grad()
        noise = torch.randn(1) + float(np.random.rand()) + random.random()
        loss = ((model(batch.float()) - noise) ** 2).mean()
        loss.backward()
        opt.step()
        if kill_at_epoch is not None and engine.state.epoch == kill_at_epoch and engine.state.iteration % 4 == 3:
            raise KeyboardInterrupt("killed mid-epoch")  # as a kill: after the previous epoch's checkpoint
        return float(loss)

    engine = Engine(step)
    save_dict = {"model": model, "optimizer": opt}
    ResumeFromCheckpoint(root, save_dict, seed=seed, seed_stream=2).attach(engine)
    AtomicCheckpointSaver(root, save_dict, save_interval=1, n_saved=1).attach(engine)
    return engine, loader


def test_resume_after_a_mid_epoch_kill_is_bit_identical(tmp_path):
    """Killed mid-epoch 3 of 4, restarted in a 'new process' (fresh objects, other global RNG state): same weights."""
    from ddcore.seeding import seed_everything

    seed_everything(0, 2)
    reference = nn.Linear(1, 1)
    engine, loader = _noisy_trainer(reference, tmp_path / "a", seed=7, max_epochs=4)
    engine.run(loader, max_epochs=4)

    seed_everything(0, 2)
    model = nn.Linear(1, 1)
    engine, loader = _noisy_trainer(model, tmp_path / "b", seed=7, max_epochs=4, kill_at_epoch=3)
    with pytest.raises(KeyboardInterrupt):
        engine.run(loader, max_epochs=4)
    torch.manual_seed(12345)  # the new process starts from another state
    seed_everything(0, 2)
    model = nn.Linear(1, 1)
    engine, loader = _noisy_trainer(model, tmp_path / "b", seed=7, max_epochs=4)
    engine.run(loader, max_epochs=4)
    assert engine.state.epoch == 4
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)
    checkpoint = torch.load(latest_checkpoint(tmp_path / "b"), weights_only=True)
    assert int(checkpoint["rng"]["seed"]) == 7 and checkpoint["rng"]["torch"].dtype == torch.uint8


def test_epoch_seeding_state_round_trip_and_seed_warning():
    import random

    import numpy as np

    from ddcore.seeding import EpochSeeding, seed_everything

    assert seed_everything(0, 1, 5) == seed_everything(0, 1, 5) != seed_everything(0, 1, 6)
    seeding = EpochSeeding(3, 1)
    state = seeding.state_dict()
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    EpochSeeding(3, 1).load_state_dict(state)
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    with pytest.warns(RuntimeWarning, match="seed 3; the configured seed 4"):
        EpochSeeding(4, 1).load_state_dict(state)


def test_resume_from_a_checkpoint_without_rng_entry_warns(tmp_path):
    model = nn.Linear(1, 1)
    engine = _engine(model)
    AtomicCheckpointSaver(tmp_path, {"model": model}, save_interval=1, n_saved=1).attach(engine)
    engine.run([0, 1], max_epochs=1)
    model2 = nn.Linear(1, 1)
    engine2 = _engine(model2)
    ResumeFromCheckpoint(tmp_path, {"model": model2}, seed=0).attach(engine2)
    with pytest.warns(RuntimeWarning, match="no \\['rng'\\] entries"):
        engine2.run([0, 1], max_epochs=2)
    assert engine2.state.epoch == 2

"""Engines, handlers and the latent cache with the real DAMM networks at tiny size."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.networks.schedulers import DDPMScheduler

from damm.engines import (
    AutoencoderEvaluator,
    AutoencoderTrainer,
    DAMMDiffusionTrainer,
    LatentCacheDataset,
    build_perceptual_loss,
    latent_crop,
)
from damm.inferers import DAMMInferer
from damm.losses import DAMMLoss
from damm.model import build_autoencoders, build_discriminators
from damm.networks import DAMMDenoiser
from ddcore.checkpoints import AtomicCheckpointSaver, ResumeFromCheckpoint, check_state_dict, latest_checkpoint

KEYS = ["np_signal", "vessel", "nuclei"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 8, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{k: torch.rand(1, size, size, generator=g) * 2 - 1 for k in KEYS} for _ in range(n)]


def _aes(spatial_dims: int = 2):
    torch.manual_seed(0)
    return build_autoencoders(KEYS, spatial_dims=spatial_dims, channels=(8, 8), latent_channels=2, norm_num_groups=4)


def _ae_trainer(aes, data, discs=None, **kw):
    loader = DataLoader(data, batch_size=4, shuffle=False)
    d_opt = None if discs is None else torch.optim.Adam(discs.parameters(), lr=1e-3)
    return AutoencoderTrainer(
        device="cpu",
        max_epochs=kw.pop("max_epochs", 1),
        train_data_loader=loader,
        autoencoders=aes,
        g_optimizer=torch.optim.Adam(aes.parameters(), lr=1e-3),
        discriminators=discs,
        d_optimizer=d_opt,
        **kw,
    )


def test_autoencoder_trainer_adversarial_switch_and_learning():
    aes = _aes()
    discs = build_discriminators(KEYS, channels=4, num_layers_d=1)
    data = _images()
    trainer = _ae_trainer(aes, data, discs, adversarial_start_iteration=1, adversarial_weight=0.1, max_epochs=3)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    before = {k: v.clone() for k, v in discs.state_dict().items()}
    trainer.run()
    assert "d_loss" not in outputs[0] and "d_loss" in outputs[1]  # adversarial terms from iteration 2
    assert all(f"l1_{k}" in outputs[0] for k in KEYS)
    assert any(not torch.equal(before[k], v) for k, v in discs.state_dict().items())
    first = sum(outputs[0][f"l1_{k}"] for k in KEYS)
    last = sum(outputs[-1][f"l1_{k}"] for k in KEYS)
    assert last < first


def test_autoencoder_evaluator_reports_psnr_ssim_per_modality():
    aes = _aes()
    loader = DataLoader(_images(4, 16), batch_size=2)
    ev = AutoencoderEvaluator("cpu", loader, aes, keys=KEYS, ssim_win_size=7)
    ev.run()
    for k in KEYS:
        assert f"psnr_{k}" in ev.state.metrics and f"ssim_{k}" in ev.state.metrics
    assert ev.state.key_metric_name == "psnr_np_signal"


def test_perceptual_loss_is_off_by_default_and_explains_missing_torchvision():
    assert build_perceptual_loss(2, 0.0) is None
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision importable here")
    except Exception:
        pass
    with pytest.raises(ImportError, match="torchvision"):
        build_perceptual_loss(2, 0.5)
    with pytest.raises(ValueError, match="perceptual_weight"):
        _ae_trainer(_aes(), _images(), perceptual_weight=0.5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_latent_cache_encodes_once_scaled(spatial_dims):
    aes = _aes(spatial_dims)
    for ae in aes.values():
        ae.set_scale_factor(2.0)
    size = (8,) * spatial_dims
    items = [{k: f"{i}_{k}" for k in KEYS} | {"divergent": i % 2 == 0} for i in range(6)]
    calls = []

    def transform(item):
        calls.append(item["np_signal"])
        g = torch.Generator().manual_seed(len(calls))
        return {k: torch.rand(1, *size, generator=g) for k in KEYS}

    ds = LatentCacheDataset(items, transform, aes, KEYS, batch_size=4, keep_fields=["divergent"])
    assert len(ds) == 6 and calls == []  # lazy
    s0 = ds[0]
    assert len(calls) == 6
    for _ in range(3):
        [ds[i] for i in range(6)]
    assert len(calls) == 6  # cached: encoded once
    g = torch.Generator().manual_seed(1)  # item 0 was the first transform call
    x = {k: torch.rand(1, *size, generator=g) for k in KEYS}
    with torch.no_grad():
        expected = aes["vessel"].encode(x["vessel"][None])[0] * 2.0
    assert torch.allclose(s0["vessel"], expected, atol=1e-5)
    assert s0["divergent"] is True and s0["np_signal"].shape == (2, *(s // 2 for s in size))


class _Subsample(torch.nn.Module):
    """A stand-in autoencoder whose latent is the image subsampled 4x (pixel values stay traceable)."""

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::4, ::4]


def test_latent_crop_cuts_one_window_for_every_modality_after_the_cache() -> None:
    g = torch.Generator().manual_seed(0)
    ramp = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 64, 64)
    items = [dict.fromkeys(KEYS, ramp + 1000 * i) for i in range(3)]
    crop = latent_crop(KEYS, [32, 16], downsampling=4, multiple=2)
    ds = LatentCacheDataset(items, dict, {k: _Subsample() for k in KEYS}, KEYS, progress=False, latent_transform=crop)
    crop.set_random_state(seed=int(torch.randint(0, 1000, (1,), generator=g)))
    whole = ds.build()
    assert whole[KEYS[0]].shape == (3, 1, 16, 16)  # the cache keeps whole latents
    seen = set()
    for _ in range(6):
        s = ds[1]
        assert all(s[k].shape == (1, 8, 4) and type(s[k]) is torch.Tensor for k in KEYS)
        assert all(torch.equal(s[k], s[KEYS[0]]) for k in KEYS)  # the same window for every modality
        q = int(s[KEYS[0]][0, 0, 0]) - 1000  # item 1's image value at (4y, 4x) is 1000 + 4y * 64 + 4x
        y, x = q // 256, (q % 256) // 4
        assert torch.equal(s[KEYS[0]], whole[KEYS[0]][1][:, y : y + 8, x : x + 4])
        seen.add((y, x))
    assert len(seen) > 1  # random windows
    assert latent_crop(KEYS, None, 4) is None
    with pytest.raises(ValueError, match="dm_crop_size: expected positive multiples of 8"):
        latent_crop(KEYS, [30, 32], downsampling=4, multiple=2)


def _diffusion_setup(tmp_path, max_epochs=2, start=2):
    torch.manual_seed(0)
    den = DAMMDenoiser(latent_channels=2, channels=(8, 8, 8), num_res_blocks=1, norm_num_groups=4, time_embed_dim=16)
    sched = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.002, beta_end=0.02, clip_sample=False)
    data = [{k: torch.randn(2, 8, 8) for k in KEYS} for _ in range(8)]
    loader = DataLoader(data, batch_size=4, shuffle=False)
    opt = torch.optim.AdamW(den.parameters(), lr=1e-3)
    save = {"denoiser": den, "optimizer": opt}
    trainer = DAMMDiffusionTrainer(
        "cpu",
        max_epochs,
        loader,
        den,
        opt,
        DAMMLoss(),
        DAMMInferer(sched, batch_size=None),
        target_key="np_signal",
        condition_keys=["vessel", "nuclei"],
        divergence_aware_start_iteration=start,
        train_handlers=[
            ResumeFromCheckpoint(tmp_path, save),
            AtomicCheckpointSaver(str(tmp_path), save, save_interval=1, n_saved=1),
        ],
    )
    return trainer, den


def test_diffusion_trainer_phase_switch_logs_and_checkpoints(tmp_path):
    trainer, _ = _diffusion_setup(tmp_path)
    outs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outs.append(dict(e.state.output)))
    trainer.run()
    assert [o["divergence_aware"] for o in outs] == [0.0, 0.0, 1.0, 1.0]
    for key in ("loss_uni", "loss_multi", "confidence_mean", "label_rate", "gated_multi_fraction"):
        assert key in outs[0] and f"epoch_{key}" in trainer.state.metrics
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "checkpoint_epoch=2.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["trainer"]["iteration"] == 4 and set(state) >= {"denoiser", "optimizer", "trainer"}
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporary files
    # a fresh trainer with more epochs resumes at epoch 2 with the saved weights
    trainer2, _ = _diffusion_setup(tmp_path, max_epochs=3)
    epochs = []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    trainer2.run()
    assert epochs == [3] and trainer2.state.iteration == 6


def test_resume_with_checkpoint_from_other_configuration_fails_before_training(tmp_path):
    trainer, _ = _diffusion_setup(tmp_path, max_epochs=1)
    trainer.run()
    torch.manual_seed(0)
    other = DAMMDenoiser(latent_channels=2, channels=(8, 8, 16), num_res_blocks=1, norm_num_groups=4, time_embed_dim=16)
    handler = ResumeFromCheckpoint(tmp_path, {"denoiser": other})
    with pytest.raises(
        ValueError, match=r"does not match the configured 'denoiser'.*checkpoint \(8, 8, 3, 3\) vs configured \(16"
    ):
        handler.check()


def test_check_state_dict_names_keys_and_shapes():
    a = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"weight: checkpoint \(2, 4\) vs configured \(2, 3\)"):
        check_state_dict(a, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "x.pt")
    with pytest.raises(ValueError, match=r"missing, e\.g\. bias"):
        check_state_dict(a, {"weight": torch.zeros(2, 3)}, "x.pt")
    check_state_dict(a, a.state_dict(), "x.pt")

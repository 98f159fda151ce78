"""Tests of the per-modality latent autoencoders (KL and VQ), the scale factor and the discriminator helper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from damm.networks import LatentAutoencoder, build_autoencoder, build_discriminator, compute_scale_factor

TINY = {"channels": (8, 16, 16), "norm_num_groups": 8, "latent_channels": 3, "num_embeddings": 16}


def _image(spatial_dims: int, batch: int = 2, channels: int = 1) -> torch.Tensor:
    size = 32 if spatial_dims == 2 else 16
    return torch.randn((batch, channels) + (size,) * spatial_dims)


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_round_trip_shapes(kind: str, spatial_dims: int) -> None:
    torch.manual_seed(0)
    ae = build_autoencoder(kind, spatial_dims=spatial_dims, in_channels=2, **TINY)
    assert isinstance(ae, LatentAutoencoder) and ae.downsample_factor == 4
    x = _image(spatial_dims, channels=2)
    z = ae.encode(x)
    assert z.shape == (2, 3, *(s // 4 for s in x.shape[2:]))
    assert ae.decode(z).shape == x.shape
    out = ae(x)
    assert out.reconstruction.shape == x.shape and out.latent.shape == z.shape
    assert out.regularisation_loss.ndim == 0 and torch.isfinite(out.regularisation_loss)
    torch.testing.assert_close(ae.encode(x), z)  # deterministic encode
    torch.testing.assert_close(ae.encode_stage_2_inputs(x), z)


def test_default_is_cpu_tile_setting() -> None:
    ae = build_autoencoder()
    assert ae.kind == "kl" and ae.downsample_factor == 4
    assert ae.encode(torch.randn(1, 1, 64, 64)).shape == (1, 4, 16, 16)


def test_kl_latent_is_posterior_mean_and_forward_samples() -> None:
    torch.manual_seed(1)
    ae = build_autoencoder("kl", **TINY)
    x = _image(2)
    z_mu, z_sigma = ae.net.encode(x)
    torch.testing.assert_close(ae.encode(x), z_mu)
    out = ae(x)
    assert not torch.allclose(out.latent, z_mu)
    kl = 0.5 * (z_mu**2 + z_sigma**2 - torch.log(z_sigma**2) - 1).flatten(1).sum(1).mean()
    torch.testing.assert_close(out.regularisation_loss, kl)


def test_vq_decode_snaps_to_codebook_without_touching_it() -> None:
    torch.manual_seed(2)
    ae = build_autoencoder("vq", **TINY)
    ae.train()
    codebook = ae.net.quantizer.quantizer.embedding.weight.detach().clone()
    z = torch.randn(2, 3, 8, 8)
    z_q = ae.quantize(z)
    # every latent vector becomes its nearest codebook row
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
    assert len(torch.unique(nearest)) > 1
    torch.testing.assert_close(z_q.permute(0, 2, 3, 1).reshape(-1, 3), codebook[nearest], rtol=0, atol=1e-6)
    torch.testing.assert_close(ae.decode(z), ae.decode(z_q))
    torch.testing.assert_close(ae.net.quantizer.quantizer.embedding.weight, codebook)  # no EMA update
    # straight-through: decode is differentiable w.r.t. the latent
    z.requires_grad_(True)
    ae.decode(z).sum().backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) > 0


def test_scale_factor_compute_apply_and_persist(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ae = build_autoencoder("kl", **TINY)
    assert float(ae.scale_factor) == 1.0 and "scale_factor" in ae.state_dict()
    batches = [_image(2, batch=4) * 3.0 for _ in range(3)]
    sf = compute_scale_factor(ae, batches)
    with torch.no_grad():
        latents = torch.cat([ae.encode(b) for b in batches])
        assert float(sf) == pytest.approx(1.0 / float(latents.double().std(unbiased=False)), rel=1e-4)
        assert compute_scale_factor(ae, [{"image": b} for b in batches], key="image") == pytest.approx(float(sf))
        ae.set_scale_factor(sf)
        scaled = torch.cat([ae.encode_scaled(b) for b in batches])
        assert float(scaled.std(unbiased=False)) == pytest.approx(1.0, rel=1e-3)
        z = ae.encode_scaled(batches[0])
        torch.testing.assert_close(ae.decode_scaled(z), ae.decode(z / sf))

        path = tmp_path / "ae.pt"
        torch.save(ae.state_dict(), path)
        fresh = build_autoencoder("kl", **TINY)
        state = torch.load(path, weights_only=True)
        assert isinstance(state["scale_factor"], torch.Tensor)
        fresh.load_state_dict(state)
        assert float(fresh.scale_factor) == pytest.approx(float(sf))
        torch.testing.assert_close(fresh.decode_scaled(z), ae.decode_scaled(z))


def test_discriminator_helper() -> None:
    disc = build_discriminator(spatial_dims=2, in_channels=1, channels=8, num_layers_d=2)
    logits = disc(torch.randn(2, 1, 32, 32))[-1]
    assert logits.shape[:2] == (2, 1) and logits.ndim == 4


def test_bad_inputs() -> None:
    ae = build_autoencoder("kl", **TINY)
    with pytest.raises(ValueError, match="expects 1 image channels"):
        ae.encode(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible by the autoencoder's downsampling factor 4"):
        ae.encode(torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"decode expects a \[B, 3"):
        ae.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="give a factor of 4"):
        build_autoencoder("kl", downsample_factor=16, **TINY)
    with pytest.raises(ValueError, match="kind must be"):
        build_autoencoder("gan")
    with pytest.raises(ValueError, match="must divide every entry"):
        build_autoencoder("kl", channels=(8, 12, 16), norm_num_groups=8)
    with pytest.raises(ValueError, match="no batches"):
        compute_scale_factor(ae, [])
    with pytest.raises(ValueError, match="positive"):
        ae.set_scale_factor(0.0)

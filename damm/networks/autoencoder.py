"""Latent autoencoders for DAMM-Diffusion (one per modality) over MONAI core classes.

The factory :func:`build_autoencoder` builds a MONAI ``AutoencoderKL`` (default) or ``VQVAE`` and wraps it in
:class:`LatentAutoencoder`, which gives both kinds one interface:

- ``encode(x)`` is deterministic: the posterior mean for KL, the *pre-quantisation* latent for VQ (the
  medfusion/DAMM convention: the diffusion model works on continuous latents);
- ``decode(z)`` maps a latent back to an image; the VQ wrapper first snaps ``z`` to the nearest codebook entry
  (straight-through, so gradients still reach ``z``) without touching the EMA codebook;
- ``forward(x)`` is the training pass and returns :class:`AutoencoderOutput`;
- ``scale_factor`` is a registered buffer (saved in the ``state_dict``), applied identically by
  ``encode_scaled`` / ``decode_scaled`` in training and sampling.

Both kinds share one meaning of ``channels``: ``channels[0]`` works at full resolution and every further level
halves the spatial size, so ``downsample_factor == 2 ** (len(channels) - 1)``.

Mixed precision: the builders make every normalisation layer compute in fp32 under ``torch.autocast``
(``ddcore.precision.keep_norms_fp32``); the KL term, the VQ codebook search/update and the latent scaling run
in fp32 on upcast tensors. Outside autocast nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import VQVAE, AutoencoderKL, PatchDiscriminator
from torch import nn

from ddcore.precision import fp32, keep_norms_fp32, upcast

__all__ = [
    "AutoencoderOutput",
    "LatentAutoencoder",
    "build_autoencoder",
    "build_discriminator",
    "compute_scale_factor",
]


@dataclass
class AutoencoderOutput:
    """Result of :meth:`LatentAutoencoder.forward` (the training pass).

    Attributes:
        reconstruction: decoded image, same shape as the input.
        latent: the latent that was decoded before quantisation (KL: a posterior sample; VQ: the
            pre-quantisation latent).
        regularisation_loss: scalar; the KL term (sum over latent elements, mean over the batch) for KL, the
            commitment loss of the EMA quantiser for VQ. Weight it in the training loss.
    """

    reconstruction: torch.Tensor
    latent: torch.Tensor
    regularisation_loss: torch.Tensor


class LatentAutoencoder(nn.Module):
    """Uniform wrapper around a MONAI ``AutoencoderKL`` or ``VQVAE``.

    Args:
        net: the wrapped MONAI autoencoder.
        kind: ``"kl"`` or ``"vq"``.
        spatial_dims: 2 or 3.
        in_channels: image channels.
        latent_channels: latent channels.
        downsample_factor: total spatial downsampling of the encoder.

    Raises:
        ValueError: for an unknown ``kind`` or a ``net`` of the wrong class.
    """

    def __init__(
        self,
        net: nn.Module,
        kind: str,
        spatial_dims: int,
        in_channels: int,
        latent_channels: int,
        downsample_factor: int,
    ) -> None:
        super().__init__()
        if kind not in ("kl", "vq"):
            raise ValueError(f"autoencoder kind must be 'kl' or 'vq', got {kind!r}")
        expected = AutoencoderKL if kind == "kl" else VQVAE
        if not isinstance(net, expected):
            raise ValueError(f"kind={kind!r} expects a {expected.__name__}, got {type(net).__name__}")
        self.net = net
        self.kind = kind
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.latent_channels = int(latent_channels)
        self.downsample_factor = int(downsample_factor)
        self.register_buffer("scale_factor", torch.tensor(1.0), persistent=True)

    # ------------------------------------------------------------------ checks
    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"autoencoder expects a [B, {self.in_channels}, *spatial] tensor with {self.spatial_dims} spatial "
                f"dims, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"autoencoder expects {self.in_channels} image channels, got {x.shape[1]}")
        bad = [s for s in x.shape[2:] if s % self.downsample_factor]
        if bad:
            raise ValueError(
                f"image spatial size {tuple(x.shape[2:])} must be divisible by the autoencoder's downsampling "
                f"factor {self.downsample_factor}"
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != self.spatial_dims + 2 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects a [B, {self.latent_channels}, *spatial] latent with {self.spatial_dims} spatial "
                f"dims, got shape {tuple(z.shape)}"
            )

    # ------------------------------------------------------------------ API
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent of ``x`` (KL: posterior mean; VQ: pre-quantisation latent).

        Args:
            x: image batch ``[B, in_channels, *spatial]``.

        Returns:
            Latent ``[B, latent_channels, *spatial / downsample_factor]``.
        """
        self._check_image(x)
        if self.kind == "kl":
            z_mu, _ = self.net.encode(x)
            return z_mu
        return self.net.encode(x)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Snap ``z`` to the codebook (VQ only; identity for KL), straight-through, no EMA update.

        Args:
            z: latent ``[B, latent_channels, *spatial]``.

        Returns:
            The quantised latent (same shape); its gradient w.r.t. ``z`` is the identity.
        """
        if self.kind == "kl":
            return z
        # EMAQuantizer.quantize/embed: the nearest code without the EMA codebook update that
        # VectorQuantizer.quantize (and so VQVAE.index_quantize / decode_stage_2_outputs) performs in training mode
        ema = self.net.quantizer.quantizer
        z = upcast(z)
        with fp32(z.device):  # MONAI disables only CUDA autocast around the codebook search
            _, _, indices = ema.quantize(z)
            z_q = ema.embed(indices).to(z.dtype)
        return z + (z_q - z).detach()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a latent (VQ: snapped to the codebook first).

        Args:
            z: latent ``[B, latent_channels, *spatial]``.

        Returns:
            Image ``[B, out_channels, *spatial * downsample_factor]``.
        """
        self._check_latent(z)
        return self.net.decode(self.quantize(z))

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """``encode(x) * scale_factor``: the latent the diffusion model sees.

        Args:
            x: image batch.

        Returns:
            Scaled latent (fp32 under autocast: the low-precision latent is upcast before scaling).
        """
        return upcast(self.encode(x)) * self.scale_factor

    def decode_scaled(self, z: torch.Tensor) -> torch.Tensor:
        """``decode(z / scale_factor)``: inverse of :meth:`encode_scaled`.

        Args:
            z: scaled latent.

        Returns:
            Image.
        """
        return self.decode(z / self.scale_factor)

    # MONAI LatentDiffusionInferer compatibility (it applies its own scale_factor argument).
    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`encode` (deterministic) for ``monai.inferers.LatentDiffusionInferer``."""
        return self.encode(x)

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`decode` for ``monai.inferers.LatentDiffusionInferer``."""
        return self.decode(z)

    def set_scale_factor(self, value: float | torch.Tensor) -> None:
        """Store a new latent scale factor in the buffer (kept by ``state_dict``).

        Args:
            value: positive finite scale factor.

        Raises:
            ValueError: if ``value`` is not positive and finite.
        """
        v = torch.as_tensor(value, dtype=self.scale_factor.dtype).reshape(())
        if not torch.isfinite(v) or v <= 0:
            raise ValueError(f"scale_factor must be positive and finite, got {float(v)}")
        self.scale_factor.copy_(v.to(self.scale_factor.device))

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        """Training pass: reconstruction, the decoded latent and the regularisation term.

        Args:
            x: image batch ``[B, in_channels, *spatial]``.

        Returns:
            :class:`AutoencoderOutput`.
        """
        self._check_image(x)
        if self.kind == "kl":
            z_mu, z_sigma = self.net.encode(x)
            z = self.net.sampling(z_mu, z_sigma)
            recon = self.net.decode(z)
            with fp32(x.device):  # the KL term in fp32 under autocast
                z_mu, z_sigma = upcast(z_mu), upcast(z_sigma)
                dims = list(range(1, z_mu.ndim))
                var = z_sigma.pow(2)
                kl = 0.5 * torch.sum(z_mu.pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1.0, dim=dims)
            return AutoencoderOutput(recon, z, kl.mean())
        z = self.net.encode(x)
        with fp32(x.device):  # codebook search, EMA update and VQ loss in fp32 under autocast
            z_q, q_loss = self.net.quantize(upcast(z))
        recon = self.net.decode(z_q)
        return AutoencoderOutput(recon, z, q_loss)


def build_autoencoder(
    kind: str = "kl",
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int | None = None,
    channels: Sequence[int] = (16, 32, 32),
    latent_channels: int = 4,
    num_res_blocks: int = 1,
    norm_num_groups: int = 8,
    attention_levels: Sequence[bool] | None = None,
    downsample_factor: int | None = None,
    num_embeddings: int = 256,
    commitment_cost: float = 0.25,
    decay: float = 0.99,
    **kwargs: Any,
) -> LatentAutoencoder:
    """Build one per-modality latent autoencoder.

    The default (the bundle's: ``channels=(16, 32, 32)``, 4 latent channels) maps a ``1 x 64 x 64`` tile to a
    ``4 x 16 x 16`` latent (4x downsampling) and is small enough for CPU. The paper's setting is 16x downsampling
    (``len(channels) == 5``) and 8 latent channels for ``256 x 256`` images.

    Args:
        kind: ``"kl"`` (MONAI ``AutoencoderKL``, default) or ``"vq"`` (MONAI ``VQVAE`` with an EMA codebook, the
            paper's choice; the diffusion model runs on pre-quantisation latents).
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: reconstructed channels (defaults to ``in_channels``).
        channels: feature channels per level; level 0 is full resolution, each further level halves the size.
        latent_channels: latent channels (KL ``latent_channels`` / VQ ``embedding_dim``).
        num_res_blocks: residual blocks (KL) or residual layers (VQ) per level.
        norm_num_groups: GroupNorm groups (KL only; must divide every entry of ``channels``).
        attention_levels: KL only; self-attention per level (default: none, and no non-local attention).
        downsample_factor: optional check: raises if it differs from ``2 ** (len(channels) - 1)``.
        num_embeddings: VQ codebook size.
        commitment_cost: VQ commitment weight.
        decay: VQ EMA decay.
        **kwargs: passed on to the MONAI class.

    Returns:
        A :class:`LatentAutoencoder` whose normalisation layers compute in fp32 under autocast.

    Raises:
        ValueError: for an unknown ``kind``, too few ``channels``, a ``downsample_factor`` that does not match
            ``channels`` or ``norm_num_groups`` not dividing the channels.
    """
    if kind not in ("kl", "vq"):
        raise ValueError(f"autoencoder kind must be 'kl' or 'vq', got {kind!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    channels = tuple(int(c) for c in channels)
    if len(channels) < 1:
        raise ValueError("channels must list at least one level")
    factor = 2 ** (len(channels) - 1)
    if downsample_factor is not None and int(downsample_factor) != factor:
        raise ValueError(
            f"downsample_factor={downsample_factor} does not match channels={channels}: {len(channels)} levels "
            f"give a factor of {factor} (a factor of 2**k needs k + 1 entries in channels)"
        )
    out_channels = in_channels if out_channels is None else out_channels
    if kind == "kl":
        bad = [c for c in channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every entry of channels={channels}")
        if attention_levels is None:
            attention_levels = (False,) * len(channels)
            kwargs.setdefault("with_encoder_nonlocal_attn", False)
            kwargs.setdefault("with_decoder_nonlocal_attn", False)
        kwargs.setdefault("include_fc", False)
        net: nn.Module = AutoencoderKL(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=(num_res_blocks,) * len(channels),
            channels=channels,
            attention_levels=tuple(attention_levels),
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            **kwargs,
        )
    else:
        # level 0 keeps the resolution (stride 1, kernel 3), every further level halves it (stride 2, kernel 4)
        down = tuple((1, 3, 1, 1) if i == 0 else (2, 4, 1, 1) for i in range(len(channels)))
        # decoder levels run deepest first; the last one (full resolution) keeps the size
        up = tuple((1, 3, 1, 1, 0) if i == len(channels) - 1 else (2, 4, 1, 1, 0) for i in range(len(channels)))
        net = VQVAE(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            num_res_layers=num_res_blocks,
            num_res_channels=channels,
            downsample_parameters=down,
            upsample_parameters=up,
            num_embeddings=num_embeddings,
            embedding_dim=latent_channels,
            commitment_cost=commitment_cost,
            decay=decay,
            **kwargs,
        )
    return keep_norms_fp32(LatentAutoencoder(net, kind, spatial_dims, in_channels, latent_channels, factor))


def build_discriminator(
    spatial_dims: int = 2,
    in_channels: int = 1,
    channels: int = 16,
    num_layers_d: int = 2,
    norm: str | tuple = "INSTANCE",
    **kwargs: Any,
) -> PatchDiscriminator:
    """MONAI ``PatchDiscriminator`` for the adversarial term of autoencoder training.

    Use ``monai.losses.PatchAdversarialLoss`` on the last element of its output list.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: channels of the first layer (doubled per layer).
        num_layers_d: number of strided layers.
        norm: normalisation (instance norm by default; batch norm is sensitive to small batches).
        **kwargs: passed on to ``PatchDiscriminator``.

    Returns:
        The discriminator (batch/group/layer norms compute in fp32 under autocast).
    """
    disc = PatchDiscriminator(
        spatial_dims=spatial_dims,
        channels=channels,
        in_channels=in_channels,
        num_layers_d=num_layers_d,
        norm=norm,
        **kwargs,
    )
    return keep_norms_fp32(disc)


@torch.no_grad()
def compute_scale_factor(
    autoencoder: LatentAutoencoder,
    batches: Iterable[torch.Tensor | dict[str, torch.Tensor]],
    key: str | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``1 / std`` of the deterministic latents of ``batches`` (one global std over all latent elements).

    The autoencoder is put in eval mode for the computation and its previous mode restored. The result is
    not stored; call ``autoencoder.set_scale_factor(result)``.

    Args:
        autoencoder: the (trained) autoencoder.
        batches: iterable of image tensors, or of dicts holding the image under ``key``.
        key: dict key of the image when ``batches`` yields dicts.
        max_batches: use at most this many batches.
        device: where to run the encoder (default: the autoencoder's device).

    Returns:
        0-dim float32 tensor.

    Raises:
        ValueError: if no batch was seen, a dict batch comes without ``key`` or the latents have zero spread.
    """
    was_training = autoencoder.training
    autoencoder.eval()
    if device is None:
        device = next(autoencoder.parameters()).device
    total, total_sq, count = 0.0, 0.0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            if isinstance(batch, dict):
                if key is None or key not in batch:
                    raise ValueError(f"batch is a dict with keys {sorted(batch)}; pass key= naming the image entry")
                batch = batch[key]
            z = autoencoder.encode(torch.as_tensor(batch).to(device)).double()
            total += float(z.sum())
            total_sq += float((z * z).sum())
            count += z.numel()
    finally:
        autoencoder.train(was_training)
    if count == 0:
        raise ValueError("compute_scale_factor got no batches")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    if var <= 0.0:
        raise ValueError("latents have zero standard deviation; cannot compute a scale factor")
    return torch.tensor(1.0 / var**0.5, dtype=torch.float32)

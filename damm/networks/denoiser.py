"""The DAMM-Diffusion two-branch denoiser (uni-modal U-Net + multi-modal U-Net with MMFM/UAFM, DAMMP gating).

Layout (spec ``damm.md`` §2.2-2.7), for ``channels = (c0, c1, ..., cL)``:

- in-conv (3x3) -> c0;
- encoder level i = 1..L: ``num_res_blocks`` resnet blocks -> ci, then a stride-2 conv downsampling for every
  level but the last (so ``L - 1`` downsamplings); every block output (and the in-conv output) is a skip;
- middle: two resnet blocks at cL;
- decoder level i = L..1: ``num_res_blocks + 1`` resnet blocks, each on ``cat(h, skip)``; the last block of the
  level maps to c(i-1) and is followed by a nearest-neighbour x2 upsampling + 3x3 conv for i > 1;
- head: GroupNorm -> SiLU -> zero-initialised 1x1 conv c0 -> latent channels.

The resnet blocks, downsampling and upsampling are MONAI's ``diffusion_model_unet`` blocks (pre-activation
``DiffusionUNetResnetBlock``, time embedding added after the first conv, zero-initialised second conv); the
sinusoidal embedding is MONAI's ``get_timestep_embedding``. One time embedding is shared by both branches.

The multi-modal branch has the same U-Net structure (separate weights). Its in-conv sees ``[x_t, z_aux...]``;
after every encoder output the MMFM fuses it with the uni-modal encoder output at the same position, and the fused
features feed the next multi-modal encoder block and the multi-modal decoder skips. At the bottleneck the UAFM
cross-attends from the uni-modal to the fused features and returns the per-token confidence ``u``. DAMMP takes
``c = mean(u)`` per sample and picks ``eps_uni`` where ``c < gamma``, else ``eps_multi``, for the whole batch at
once.

Mixed precision: the network runs under ``torch.autocast`` (``ddcore.precision.autocast``) unchanged. Every
normalisation layer computes in fp32 (``keep_norms_fp32``), the UAFM confidence and softmax are fp32 islands, and
the confidence ``c``, the gating decision and every returned prediction are fp32. Outside autocast nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets.diffusion_model_unet import (
    DiffusionUnetDownsample,
    DiffusionUNetResnetBlock,
    WrappedUpsample,
    get_timestep_embedding,
    zero_module,
)
from torch import nn

from damm.networks.fusion import MMFM, UAFM
from ddcore.precision import fp32, keep_norms_fp32, upcast
from ddcore.small_conv import matmul_small_convs

__all__ = [
    "DEMO_DENOISER_CONFIG",
    "PAPER_DENOISER_CONFIG",
    "DAMMDenoiser",
    "DAMMOutput",
    "count_parameters",
    "paper_denoiser_config",
    "reference_forward_all",
]

#: The paper-scale configuration: 8-channel 16x16 latents (x_t + vessel anchor + nuclei auxiliary),
#: channels 64/128/256/512, two resnet blocks per level, two downsamplings, no self-attention, a 1024-wide time
#: embedding (sinusoid of width 256), one attention head in UAFM. Parameter count: see ``count_parameters``.
PAPER_DENOISER_CONFIG: dict[str, Any] = {
    "spatial_dims": 2,
    "latent_channels": 8,
    "num_auxiliary": 1,
    "channels": (64, 128, 256, 512),
    "num_res_blocks": 2,
    "confidence_source": "uni",
    "norm_num_groups": 32,
    "time_embed_dim": 1024,
    "num_heads": 1,
    "se_reduction": 16,
}

#: A CPU-sized configuration for 4-channel 16x16 latents (64x64 tiles, 4x autoencoder downsampling).
DEMO_DENOISER_CONFIG: dict[str, Any] = {
    "spatial_dims": 2,
    "latent_channels": 4,
    "num_auxiliary": 1,
    "channels": (32, 32, 64, 64),
    "num_res_blocks": 2,
    "confidence_source": "uni",
    "norm_num_groups": 8,
    "time_embed_dim": 128,
    "num_heads": 1,
    "se_reduction": 16,
}


def paper_denoiser_config(**overrides: Any) -> dict[str, Any]:
    """A copy of :data:`PAPER_DENOISER_CONFIG` with ``overrides`` applied.

    Args:
        **overrides: constructor arguments to change (e.g. ``num_auxiliary=3``).

    Returns:
        Keyword arguments for :class:`DAMMDenoiser`.
    """
    cfg = dict(PAPER_DENOISER_CONFIG)
    cfg.update(overrides)
    return cfg


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of ``module`` (works on the meta device).

    Args:
        module: any module.

    Returns:
        Total ``numel`` over ``module.parameters()``.
    """
    return sum(p.numel() for p in module.parameters())


@dataclass
class DAMMOutput:
    """Everything the DAMM denoiser computes in one pass.

    Attributes:
        eps_uni: uni-modal noise prediction ``[B, C_lat, *spatial]``.
        eps_multi: multi-modal noise prediction, same shape.
        confidence_map: UAFM confidence ``u`` at the bottleneck, ``[B, 1, *bottleneck_spatial]`` in (0, 1).
        confidence: ``c = mean(u)`` per sample, ``[B]``.
        eps: the prediction selected by ``branch`` (``"damm"``: ``eps_uni`` where ``c < gamma`` else
            ``eps_multi``).
    """

    eps_uni: torch.Tensor
    eps_multi: torch.Tensor
    confidence_map: torch.Tensor
    confidence: torch.Tensor
    eps: torch.Tensor


class _DecoderBlock(nn.Module):
    """One decoder resnet block on ``cat(h, skip)``, optionally followed by an x2 upsampling."""

    def __init__(self, resnet: nn.Module, upsampler: nn.Module | None) -> None:
        super().__init__()
        self.resnet = resnet
        self.upsampler = upsampler

    def forward(self, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.resnet(torch.cat([h, skip], dim=1), emb)
        if self.upsampler is not None:
            h = self.upsampler(h, emb)
        return h


class _UNetBranch(nn.Module):
    """One branch's U-Net (no time embedding: it receives the shared one)."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        temb_channels: int,
        norm_num_groups: int,
        norm_eps: float,
    ) -> None:
        super().__init__()
        ch = list(channels)

        def resnet(cin: int, cout: int) -> DiffusionUNetResnetBlock:
            return DiffusionUNetResnetBlock(
                spatial_dims=spatial_dims,
                in_channels=cin,
                out_channels=cout,
                temb_channels=temb_channels,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
            )

        self.in_conv = Convolution(spatial_dims, in_channels, ch[0], strides=1, kernel_size=3, conv_only=True)
        encoder: list[nn.Module] = []
        skip_channels = [ch[0]]
        for i in range(1, len(ch)):
            for k in range(num_res_blocks):
                encoder.append(resnet(ch[i - 1] if k == 0 else ch[i], ch[i]))
                skip_channels.append(ch[i])
            if i < len(ch) - 1:
                encoder.append(DiffusionUnetDownsample(spatial_dims, ch[i], use_conv=True, out_channels=ch[i]))
                skip_channels.append(ch[i])
        self.encoder = nn.ModuleList(encoder)
        self.skip_channels = skip_channels
        self.middle = nn.ModuleList([resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])])

        decoder: list[nn.Module] = []
        skips = list(skip_channels)
        h_ch = ch[-1]
        for i in range(len(ch) - 1, 0, -1):
            for k in range(num_res_blocks, -1, -1):
                out_ch = ch[i] if k > 0 else ch[i - 1]
                block = resnet(h_ch + skips.pop(), out_ch)
                up = None
                if k == 0 and i > 1:
                    up = WrappedUpsample(
                        spatial_dims=spatial_dims,
                        mode="nontrainable",
                        in_channels=out_ch,
                        out_channels=out_ch,
                        interp_mode="nearest",
                        scale_factor=2.0,
                        post_conv=Convolution(spatial_dims, out_ch, out_ch, strides=1, kernel_size=3, conv_only=True),
                        align_corners=None,
                    )
                decoder.append(_DecoderBlock(block, up))
                h_ch = out_ch
        self.decoder = nn.ModuleList(decoder)
        self.out = nn.Sequential(
            nn.GroupNorm(norm_num_groups, ch[0], eps=norm_eps),
            nn.SiLU(),
            zero_module(Convolution(spatial_dims, ch[0], out_channels, strides=1, kernel_size=1, conv_only=True)),
        )

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.in_conv(x)]
        for block in self.encoder:
            skips.append(block(skips[-1], emb))
        return skips

    def decode(self, h: torch.Tensor, skips: Sequence[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        for block in self.middle:
            h = block(h, emb)
        skips = list(skips)
        for block in self.decoder:
            h = block(h, skips.pop(), emb)
        return self.out(h)


class DAMMDenoiser(nn.Module):
    """Two-branch DAMM-Diffusion noise predictor with batched DAMMP gating.

    Input convention: ``x = cat([x_t, z_anchor, z_aux_1, ..., z_aux_K], dim=1)``, each part
    ``latent_channels`` wide (so MONAI's ``DiffusionInferer(mode="concat")`` can pass
    ``cat([x_t, condition])`` with ``condition = cat([z_anchor, z_aux...])``).

    Args:
        spatial_dims: 2 or 3.
        latent_channels: channels of x_t and of every condition latent; also the output channels.
        num_auxiliary: number K >= 1 of auxiliary latents (multi-modal branch input).
        channels: U-Net widths ``(c0, c1, ..., cL)``; ``L >= 2``; ``L - 1`` downsamplings.
        num_res_blocks: resnet blocks per encoder level (the decoder has one more per level).
        gamma: DAMMP threshold; a plain attribute that may be changed later.
        confidence_source: ``"joint"`` (the bundle's default), ``"uni"`` (official) or ``"conditions"`` (a small
            network on the clean condition latents, not in the paper); see :class:`~damm.networks.fusion.UAFM`.
        norm: MMFM normalisation, ``"group"`` (default) or ``"batch"`` (official; batch-dependent).
        branch: ``"damm"`` (gated), ``"uni"`` or ``"multi"``; what ``forward`` returns and ``DAMMOutput.eps``
            holds. A plain attribute that may be changed later.
        norm_num_groups: GroupNorm groups everywhere (must divide every channel count).
        norm_eps: GroupNorm epsilon of the resnet blocks and UAFM.
        time_embed_dim: width of the shared time embedding (None: ``4 * c0``); the sinusoid has a quarter of it.
        num_heads: UAFM attention heads.
        se_reduction: MMFM squeeze-and-excitation reduction ratio.
        small_conv_max_pixels: 2D convolutions on maps of at most this many positions run as one matmul
            (:func:`ddcore.small_conv.matmul_small_convs`; same weights and results, faster backward on a CPU);
            ``0``: every convolution is ``nn.Conv2d``'s.

    Raises:
        ValueError: for inconsistent settings (see the messages).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        latent_channels: int = 4,
        num_auxiliary: int = 1,
        channels: Sequence[int] = (16, 32, 32, 64),
        num_res_blocks: int = 1,
        gamma: float = 0.5,
        confidence_source: str = "joint",
        norm: str = "group",
        branch: str = "damm",
        norm_num_groups: int = 8,
        norm_eps: float = 1e-6,
        time_embed_dim: int | None = 64,
        num_heads: int = 1,
        se_reduction: int = 16,
        small_conv_max_pixels: int = 16,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(num_auxiliary) < 1:
            raise ValueError(f"num_auxiliary must be >= 1 (the multi-modal branch needs an input), got {num_auxiliary}")
        channels = tuple(int(c) for c in channels)
        if len(channels) < 3:
            raise ValueError(f"channels needs at least 3 entries (in-conv + 2 levels), got {channels}")
        bad = [c for c in channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every entry of channels={channels}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch', got {norm!r}")
        self._check_branch(branch)
        self.spatial_dims = int(spatial_dims)
        self.latent_channels = int(latent_channels)
        self.num_auxiliary = int(num_auxiliary)
        self.channels = channels
        self.num_res_blocks = int(num_res_blocks)
        self.gamma = float(gamma)
        self.branch = branch
        self.confidence_source = confidence_source
        self.norm = norm
        self.downsample_factor = 2 ** (len(channels) - 2)
        self.in_channels = self.latent_channels * (2 + self.num_auxiliary)

        time_embed_dim = int(time_embed_dim) if time_embed_dim is not None else 4 * channels[0]
        self.time_sinusoid_dim = max(2, time_embed_dim // 4)
        self.time_embed = nn.Sequential(
            nn.Linear(self.time_sinusoid_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        branch_args = {
            "spatial_dims": spatial_dims,
            "out_channels": latent_channels,
            "channels": channels,
            "num_res_blocks": num_res_blocks,
            "temb_channels": time_embed_dim,
            "norm_num_groups": norm_num_groups,
            "norm_eps": norm_eps,
        }
        self.uni = _UNetBranch(in_channels=2 * latent_channels, **branch_args)
        self.multi = _UNetBranch(in_channels=(1 + self.num_auxiliary) * latent_channels, **branch_args)
        self.mmfm = nn.ModuleList(
            MMFM(spatial_dims, c, norm=norm, num_groups=norm_num_groups, se_reduction=se_reduction)
            for c in self.uni.skip_channels
        )
        self.uafm = UAFM(
            spatial_dims,
            channels[-1],
            num_groups=norm_num_groups,
            num_heads=num_heads,
            confidence_source=confidence_source,
            norm_eps=norm_eps,
            condition_channels=(1 + self.num_auxiliary) * self.latent_channels,
        )
        # mixed precision: every GroupNorm/BatchNorm computes and returns fp32 under autocast (same state dict)
        keep_norms_fp32(self)
        matmul_small_convs(self, int(small_conv_max_pixels))

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_branch(branch: str) -> None:
        if branch not in ("damm", "uni", "multi"):
            raise ValueError(f"branch must be 'damm', 'uni' or 'multi', got {branch!r}")

    def _check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != self.spatial_dims + 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"DAMMDenoiser expects x of shape [B, {self.in_channels}, *spatial] with {self.spatial_dims} spatial "
                f"dims, got {shape}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"DAMMDenoiser expects {self.in_channels} input channels = {self.latent_channels} (x_t) + "
                f"{self.latent_channels} (anchor) + {self.num_auxiliary} x {self.latent_channels} (auxiliary), "
                f"got {x.shape[1]}"
            )
        bad = [s for s in x.shape[2:] if s % self.downsample_factor]
        if bad:
            raise ValueError(
                f"latent spatial size {tuple(x.shape[2:])} must be divisible by the denoiser's total downsampling "
                f"{self.downsample_factor}"
            )
        b = x.shape[0]
        # a tensor stays a tensor (traced as an input by torch.jit.trace, not baked in as a constant)
        if isinstance(timesteps, torch.Tensor):
            t = timesteps.to(x.device)
        else:
            t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
            t = t.reshape(1).expand(b)
        elif t.ndim != 1 or t.shape[0] != b:
            raise ValueError(f"timesteps must have shape ({b},) (one per sample) or (1,), got {tuple(t.shape)}")
        return t

    # ------------------------------------------------------------------ pieces
    def time_embedding(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Shared time embedding.

        Args:
            timesteps: ``[B]`` integer (or float) steps.
            dtype: dtype of the result.

        Returns:
            ``[B, time_embed_dim]``.
        """
        emb = get_timestep_embedding(timesteps, self.time_sinusoid_dim).to(dtype)
        return self.time_embed(emb)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lc = self.latent_channels
        x_t = x[:, :lc]
        uni_in = x[:, : 2 * lc]
        multi_in = torch.cat([x_t, x[:, 2 * lc :]], dim=1)
        return uni_in, multi_in

    def _run(
        self, x: torch.Tensor, timesteps: torch.Tensor, use_uncertainty: bool, need_uni: bool, need_multi: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        t = self._check_inputs(x, timesteps)
        emb = self.time_embedding(t, x.dtype)
        uni_in, multi_in = self._split(x)
        eps_uni = eps_multi = u = None
        if not need_multi:
            xs = self.uni.encode(uni_in, emb)
            return self.uni.decode(xs[-1], xs, emb), None, None
        # interleaved encoders: the multi-modal block l runs on the fused features of position l - 1
        xs = [self.uni.in_conv(uni_in)]
        fused = [self.mmfm[0](xs[0], self.multi.in_conv(multi_in))]
        for l_idx, (ub, mb) in enumerate(zip(self.uni.encoder, self.multi.encoder), start=1):
            xs.append(ub(xs[-1], emb))
            fused.append(self.mmfm[l_idx](xs[-1], mb(fused[-1], emb)))
        conditions = x[:, self.latent_channels :] if self.confidence_source == "conditions" else None
        bottleneck, u = self.uafm(xs[-1], fused[-1], use_uncertainty=use_uncertainty, conditions=conditions)
        if need_uni:
            eps_uni = self.uni.decode(xs[-1], xs, emb)
        eps_multi = self.multi.decode(bottleneck, fused, emb)
        return eps_uni, eps_multi, u

    def gate(self, eps_uni: torch.Tensor, eps_multi: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """DAMMP: ``eps_uni`` where ``confidence < gamma``, else ``eps_multi`` (per sample, batched).

        Args:
            eps_uni: ``[B, ...]``.
            eps_multi: ``[B, ...]``.
            confidence: ``[B]``.

        Returns:
            The gated prediction ``[B, ...]``.
        """
        use_uni = (confidence < self.gamma).reshape(-1, *([1] * (eps_uni.ndim - 1)))
        return torch.where(use_uni, eps_uni, eps_multi)

    # ------------------------------------------------------------------ entry points
    def forward_all(self, x: torch.Tensor, timesteps: torch.Tensor, use_uncertainty: bool = True) -> DAMMOutput:
        """Run both branches and return every prediction, the confidence and the gated output.

        Args:
            x: ``cat([x_t, z_anchor, z_aux_1, ...], dim=1)``, ``[B, (2 + K) * C_lat, *spatial]``.
            timesteps: ``[B]`` (or ``[1]`` / scalar, broadcast to the batch).
            use_uncertainty: multiply the UAFM logits by ``u`` (False during warm-up).

        Returns:
            :class:`DAMMOutput`; under autocast every tensor of it is fp32 (the predictions are upcast).

        Raises:
            ValueError: wrong channel count, spatial size not divisible by the downsampling, bad timesteps shape.
        """
        self._check_branch(self.branch)
        eps_uni, eps_multi, u = self._run(x, timesteps, use_uncertainty, need_uni=True, need_multi=True)
        assert eps_uni is not None and eps_multi is not None and u is not None
        bottleneck_shape = tuple(s // self.downsample_factor for s in x.shape[2:])
        with fp32(x.device):  # confidence, gating decision and gated output in fp32 under autocast
            eps_uni, eps_multi, u = upcast(eps_uni), upcast(eps_multi), upcast(u)
            confidence = u.mean(dim=1)
            if self.branch == "uni":
                eps = eps_uni
            elif self.branch == "multi":
                eps = eps_multi
            else:
                eps = self.gate(eps_uni, eps_multi, confidence)
        return DAMMOutput(
            eps_uni=eps_uni,
            eps_multi=eps_multi,
            confidence_map=u.reshape(x.shape[0], 1, *bottleneck_shape),
            confidence=confidence,
            eps=eps,
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Single-tensor prediction for MONAI inferers (``mode="concat"``).

        Args:
            x: ``cat([x_t, z_anchor, z_aux_1, ...], dim=1)``.
            timesteps: ``[B]`` (or ``[1]`` / scalar, as ``DiffusionInferer.sample`` passes).
            context: must be None (the conditions travel in ``x``).

        Returns:
            The prediction selected by ``self.branch`` (``"damm"``: DAMMP-gated), ``[B, C_lat, *spatial]``, fp32
            under autocast.

        Raises:
            ValueError: for a non-None ``context`` or bad inputs.
        """
        if context is not None:
            raise ValueError(
                "DAMMDenoiser takes its conditions concatenated to x (inferer mode='concat'); context must be None"
            )
        self._check_branch(self.branch)
        if self.branch == "uni":
            eps_uni, _, _ = self._run(x, timesteps, True, need_uni=True, need_multi=False)
            assert eps_uni is not None
            return upcast(eps_uni)
        if self.branch == "multi":
            _, eps_multi, _ = self._run(x, timesteps, True, need_uni=False, need_multi=True)
            assert eps_multi is not None
            return upcast(eps_multi)
        return self.forward_all(x, timesteps, use_uncertainty=True).eps


def reference_forward_all(
    model: DAMMDenoiser, x: torch.Tensor, timesteps: torch.Tensor, use_uncertainty: bool = True
) -> DAMMOutput:
    """Per-sample reference of :meth:`DAMMDenoiser.forward_all`, as the official code runs DAMMP.

    Loops over the batch with micro-batch 1 and picks the branch with a Python ``if c < gamma`` per sample.
    With GroupNorm (default) it equals the batched path; with BatchNorm in training mode it does not (the
    official release's problem). Used by tests and benchmarks only.

    Args:
        model: the denoiser.
        x: ``[B, ...]`` input as for ``forward_all``.
        timesteps: ``[B]`` (or broadcastable).
        use_uncertainty: as in ``forward_all``.

    Returns:
        :class:`DAMMOutput` assembled from the per-sample results.
    """
    t = model._check_inputs(x, timesteps)
    outs = []
    for i in range(x.shape[0]):
        o = model.forward_all(x[i : i + 1], t[i : i + 1], use_uncertainty=use_uncertainty)
        if model.branch == "uni":
            eps = o.eps_uni
        elif model.branch == "multi":
            eps = o.eps_multi
        else:
            eps = o.eps_uni if float(o.confidence.detach()) < model.gamma else o.eps_multi
        outs.append((o, eps))
    return DAMMOutput(
        eps_uni=torch.cat([o.eps_uni for o, _ in outs]),
        eps_multi=torch.cat([o.eps_multi for o, _ in outs]),
        confidence_map=torch.cat([o.confidence_map for o, _ in outs]),
        confidence=torch.cat([o.confidence for o, _ in outs]),
        eps=torch.cat([e for _, e in outs]),
    )

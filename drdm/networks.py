"""DRDM recovery network: the atrous residual U-Net of spec drdm.md §2.2 with K-fold recursive refinement.

``RecoveryNet(x_t, t)`` returns a voxel-unit field ``û`` ``[B, d, *S]`` that estimates the inverse of the step
field ``ψ_t`` (warping ``x_t`` by ``û`` undoes the last forward step). Built from MONAI ``Conv`` / ``Norm`` / ``Act``
factories for ``spatial_dims`` 2 or 3. The output head is zero-initialised, so an untrained network is the
identity (``û = 0``). Inputs of any size are zero-padded to a multiple of ``2^levels`` and the output cropped
back, so non-square / non-cubic images work.

Precision: under ``torch.autocast`` (the ``precision`` setting of the DRDM trainer and sampler) the convolutions
and time MLPs run in bf16/fp16, while the (instance) norms, the output head, the returned field and the warp and
composition between recursive passes stay fp32 (:func:`ddcore.precision.keep_norms_fp32` and fp32 islands).
Memory format: ``channels_last`` (default) runs 2D convolutions in NHWC layout (3D stays contiguous: NDHWC bf16
backward gave intermittent NaN gradients on CPU), measured faster on CPU for
these narrow (10-40 channel) convolutions in fp32 and bf16, training and sampling (``benchmarks/drdm_sampling.py``);
parameters and checkpoints are unaffected apart from their strides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Norm
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from ddcore.precision import fp32, keep_norms_fp32
from drdm.fields import compose, warp

__all__ = ["AtrousBlock", "RecoveryNet", "TimeMLP", "make_norm"]

_MEMORY_FORMATS = ("channels_last", "contiguous")


def make_norm(norm: str | None, spatial_dims: int, channels: int) -> nn.Module:
    """The normalisation layer of an atrous block.

    ``"instance"`` (affine instance normalisation, as in the official network) is built as
    ``nn.GroupNorm(channels, channels)``: one group per channel normalises each channel of each sample over space,
    which is instance normalisation with the same ``weight`` / ``bias`` parameters (checkpoints of either load into
    the other), and PyTorch's GroupNorm kernel is several times faster on CPU than ``instance_norm`` and works on
    channels-last tensors without layout copies. Other names go through MONAI's ``Norm`` factory.

    Args:
        norm: ``"instance"``, another MONAI ``Norm`` name, or ``None`` (identity).
        spatial_dims: 2 or 3.
        channels: number of channels.

    Returns:
        The layer.
    """
    if not norm:
        return nn.Identity()
    if str(norm).lower() == "instance":
        return nn.GroupNorm(channels, channels, eps=1e-5, affine=True)
    return Norm[norm, spatial_dims](channels, affine=True)


class AtrousBlock(nn.Module):
    """``h = Norm(Conv3(x))``; ``out = act(h + Conv3_dil3(act(Conv3_dil1(act(h)))))``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        norm: ``"instance"`` (affine instance normalisation after the first conv, see :func:`make_norm`) or
            ``None``.
        negative_slope: LeakyReLU slope (official 1e-6, i.e. effectively ReLU).
        dilation: dilation of the second residual conv (official 3).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: str | None = "instance",
        negative_slope: float = 1e-6,
        dilation: int = 3,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.conv_in = conv(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = make_norm(norm, spatial_dims, out_channels)
        self.conv_a = conv(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_b = conv(out_channels, out_channels, kernel_size=3, padding=dilation, dilation=dilation)
        self.act = Act["leakyrelu"](negative_slope=negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Without autograd (sampling) the second activation and the residual sum run in place on fresh
        temporaries: the same values with two fewer full-size tensors per block (these element-wise ops are
        memory-bound). The sum stays out of place when the dtypes differ (under autocast the norm's fp32 output
        ``h`` meets a bf16 ``branch``: the sum must promote to fp32 as in training).
        """
        h = self.norm(self.conv_in(x))
        if torch.is_grad_enabled():
            branch = self.conv_b(self.act(self.conv_a(self.act(h))))
            return self.act(h + branch)
        slope = self.act.negative_slope
        branch = self.conv_b(F.leaky_relu(self.conv_a(self.act(h)), slope, inplace=True))
        total = branch.add_(h) if branch.dtype == h.dtype and branch.shape == h.shape else h + branch
        return F.leaky_relu(total, slope, inplace=True)


class TimeMLP(nn.Module):
    """``Linear(embed_dim -> c) -> ReLU -> Linear(c -> c)``, broadcast over space.

    Args:
        embed_dim: sinusoidal embedding size.
        channels: output channels.
        spatial_dims: 2 or 3 (number of trailing singleton dims of the output).
    """

    def __init__(self, embed_dim: int, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.spatial_dims = spatial_dims

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """``[B, embed_dim] -> [B, c, 1, ...]``."""
        return self.mlp(emb).view(emb.shape[0], -1, *([1] * self.spatial_dims))


class RecoveryNet(nn.Module):
    """Atrous residual U-Net ``D_θ(x, t)`` with per-level time MLPs and recursive refinement (RecResACNet).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: channels per resolution level (official ``(10, 20, 40)``: 3 levels, S, S/2, S/4, bottleneck S/8).
        embed_dim: sinusoidal time-embedding size (official 100).
        norm: encoder/bottleneck normalisation (``"instance"`` or ``None``); the decoder has none (official).
        negative_slope: LeakyReLU slope.
        recursions: ``K`` passes per call with shared weights (official 2); ``û ← û ⊕ D(x∘(id+û), t)``.
        image_padding_mode: padding when re-warping the input between passes (official zeros).
        field_padding_mode: padding when composing the passes' fields (official border).
        max_period: sinusoidal embedding period.
        memory_format: ``"channels_last"`` (default: NHWC convolutions in 2D, faster on CPU) or ``"contiguous"``.
            3D networks always run contiguous (NDHWC bf16 backward gave intermittent NaN gradients on CPU). Only
            the layout of the weights and activations changes; outputs are contiguous.

    Raises:
        ValueError: bad ``spatial_dims``, ``channels``, ``recursions`` or ``memory_format``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: Sequence[int] = (10, 20, 40),
        embed_dim: int = 100,
        norm: str | None = "instance",
        negative_slope: float = 1e-6,
        recursions: int = 2,
        image_padding_mode: str = "zeros",
        field_padding_mode: str = "border",
        max_period: int = 10000,
        memory_format: str = "channels_last",
    ) -> None:
        super().__init__()
        if memory_format not in _MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {_MEMORY_FORMATS}, got {memory_format!r}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {tuple(channels)}.")
        if recursions < 1:
            raise ValueError(f"recursions must be >= 1, got {recursions}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.channels = tuple(int(c) for c in channels)
        self.embed_dim = embed_dim
        self.recursions = recursions
        self.image_padding_mode = image_padding_mode
        self.field_padding_mode = field_padding_mode
        self.max_period = max_period
        d, ch = spatial_dims, self.channels

        def block(cin: int, cout: int, use_norm: bool) -> AtrousBlock:
            return AtrousBlock(d, cin, cout, norm if use_norm else None, negative_slope)

        conv, convt = Conv[Conv.CONV, d], Conv[Conv.CONVTRANS, d]
        self.enc_time = nn.ModuleList()
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        prev = in_channels
        for c in ch:
            self.enc_time.append(TimeMLP(embed_dim, prev, d))
            self.enc.append(nn.Sequential(block(prev, c, True), block(c, c, True), block(c, c, True)))
            self.down.append(conv(c, c, kernel_size=4, stride=2, padding=1))
            prev = c
        mid = ch[-2]
        self.mid_time = TimeMLP(embed_dim, ch[-1], d)
        self.mid = nn.Sequential(block(ch[-1], mid, True), block(mid, mid, True), block(mid, ch[-1], True))
        self.up = nn.ModuleList()
        self.dec_time = nn.ModuleList()
        self.dec = nn.ModuleList()
        prev = ch[-1]
        for k in range(len(ch) - 1, -1, -1):
            c, c_next = ch[k], ch[max(k - 1, 0)]
            self.up.append(convt(prev, prev, kernel_size=4, stride=2, padding=1))
            self.dec_time.append(TimeMLP(embed_dim, prev + c, d))
            self.dec.append(
                nn.Sequential(block(prev + c, c, False), block(c, c_next, False), block(c_next, c_next, False))
            )
            prev = c_next
        self.head = conv(prev, d, kernel_size=3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        keep_norms_fp32(self)
        self.memory_format = memory_format
        self._layout = torch.contiguous_format
        # 2D only: NDHWC (channels_last_3d) bf16 backward gave intermittent NaN gradients on CPU (4 of 6 one-step
        # trainings of a 3D net; 0 of 6 contiguous), so 3D always runs contiguous
        if memory_format == "channels_last" and d == 2:
            self._layout = torch.channels_last
            self.to(memory_format=self._layout)

    @property
    def size_divisor(self) -> int:
        """Inputs are padded internally to a multiple of this size."""
        return 2 ** len(self.channels)

    def single_pass(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One pass ``D_θ(x, t)`` (no recursion).

        Args:
            x: ``[B, C, *S]`` image (any spatial size).
            t: ``[B]`` levels.

        Returns:
            ``[B, d, *S]`` voxel-unit field, float32 and contiguous whatever the autocast state (the output head
            is an fp32 island: the field is the quantity the sampler composes 80 times).
        """
        spatial = x.shape[2:]
        div = self.size_divisor
        pad: list[int] = []
        for s in reversed(spatial):
            pad += [0, (-s) % div]
        h = F.pad(x, pad) if any(pad) else x
        h = h.contiguous(memory_format=self._layout)
        emb = get_timestep_embedding(t.reshape(-1).float(), self.embed_dim, self.max_period).to(x.dtype)
        skips = []
        for te, enc, down in zip(self.enc_time, self.enc, self.down):
            h = enc(h + te(emb))
            skips.append(h)
            h = down(h)
        h = self.mid(h * self.mid_time(emb))
        for up, te, dec in zip(self.up, self.dec_time, self.dec):
            h = torch.cat([up(h), skips.pop()], dim=1)
            h = dec(h + te(emb))
        with fp32(h.device):
            out = self.head(h.float())
        return out[(slice(None), slice(None), *(slice(0, s) for s in spatial))].contiguous()

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """``K`` recursive passes: ``û₁ = D(x, t)``; ``û_{k+1} = û_k ⊕ D(x∘(id + û_k), t)``.

        Args:
            x: ``[B, C, *S]`` deformed image.
            t: ``[B]`` levels or an int.

        Returns:
            ``[B, d, *S]`` voxel-unit estimate of ``ψ_t^{-1}`` (float32; warp and composition between the passes
            run in fp32 under autocast).
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"RecoveryNet expects [B, {self.in_channels}, *S] with {self.spatial_dims} spatial dims, "
                f"got {tuple(x.shape)}."
            )
        tt = torch.as_tensor(t, device=x.device).reshape(-1)
        if tt.numel() == 1:
            tt = tt.expand(x.shape[0])
        field = self.single_pass(x, tt)
        for _ in range(self.recursions - 1):
            refined = self.single_pass(warp(x, field, "bilinear", self.image_padding_mode), tt)
            field = compose(field, refined, self.field_padding_mode)
        return field

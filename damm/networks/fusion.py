"""DAMM fusion modules: MMFM (multi-modal fusion) and UAFM (uncertainty-aware cross-attention fusion).

Both are written from the DAMM-Diffusion description (spec ``damm.md`` §2.5-2.6). The normalisation of MMFM is
configurable: GroupNorm by default (per-sample statistics, so batched and per-sample evaluation agree), BatchNorm
as in the official release.
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from ddcore.precision import fp32, upcast

__all__ = [
    "CONFIDENCE_SOURCES",
    "MMFM",
    "UAFM",
    "ConditionConfidence",
    "ModalityGate",
    "SqueezeExcitation",
    "make_norm",
]

#: where UAFM's confidence ``u`` comes from (see :class:`UAFM`).
CONFIDENCE_SOURCES = ("uni", "joint", "conditions")


def make_norm(norm: str, spatial_dims: int, channels: int, num_groups: int, eps: float = 1e-5) -> nn.Module:
    """GroupNorm or BatchNorm through MONAI's norm factory.

    Args:
        norm: ``"group"`` or ``"batch"``.
        spatial_dims: 1, 2 or 3 (selects BatchNorm1d/2d/3d).
        channels: normalised channels.
        num_groups: GroupNorm groups (must divide ``channels``).
        eps: numerical epsilon.

    Returns:
        The normalisation layer.

    Raises:
        ValueError: for an unknown ``norm`` or ``num_groups`` not dividing ``channels``.
    """
    if norm == "group":
        if channels % num_groups:
            raise ValueError(f"GroupNorm with {num_groups} groups needs channels divisible by it, got {channels}")
        return get_norm_layer(("group", {"num_groups": num_groups, "eps": eps}), spatial_dims, channels)
    if norm == "batch":
        return get_norm_layer(("batch", {"eps": eps}), spatial_dims, channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {norm!r}")


def _conv1x1(spatial_dims: int, cin: int, cout: int, bias: bool = True) -> nn.Module:
    return Convolution(spatial_dims, cin, cout, kernel_size=1, strides=1, padding=0, conv_only=True, bias=bias)


class ModalityGate(nn.Module):
    """Element-wise soft gate ``x * sigmoid(norm(conv(silu(norm(conv(x))))))`` (the "mask layer" of MMFM).

    Args:
        spatial_dims: 2 or 3.
        channels: input (and output) channels C; the hidden width is 2C.
        norm: ``"group"`` or ``"batch"``.
        num_groups: GroupNorm groups.
    """

    def __init__(self, spatial_dims: int, channels: int, norm: str = "group", num_groups: int = 32) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            _conv1x1(spatial_dims, channels, 2 * channels),
            make_norm(norm, spatial_dims, 2 * channels, num_groups),
            nn.SiLU(),
            _conv1x1(spatial_dims, 2 * channels, channels),
            make_norm(norm, spatial_dims, channels, num_groups),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate ``x``.

        Args:
            x: ``[B, C, *spatial]``.

        Returns:
            ``x`` times its gate, same shape.
        """
        return x * self.gate(x)


class SqueezeExcitation(nn.Module):
    """Channel squeeze-and-excitation: global mean -> Linear (no bias) -> ReLU -> Linear (no bias) -> sigmoid.

    Args:
        channels: channels C.
        reduction: hidden width is ``max(1, C // reduction)``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale the channels of ``x``.

        Args:
            x: ``[B, C, *spatial]``.

        Returns:
            Same shape.
        """
        w = self.fc(x.flatten(2).mean(-1))
        return x * w.reshape(*w.shape, *([1] * (x.ndim - 2)))


class MMFM(nn.Module):
    """Multi-Modal Fusion Module: gate each stream, concatenate, SE, 1x1 conv 2C -> C, norm (no activation).

    Args:
        spatial_dims: 2 or 3.
        channels: channels C of each stream.
        norm: ``"group"`` (default) or ``"batch"`` (official).
        num_groups: GroupNorm groups.
        se_reduction: squeeze-and-excitation reduction ratio.
    """

    def __init__(
        self, spatial_dims: int, channels: int, norm: str = "group", num_groups: int = 32, se_reduction: int = 16
    ) -> None:
        super().__init__()
        self.gate_uni = ModalityGate(spatial_dims, channels, norm, num_groups)
        self.gate_multi = ModalityGate(spatial_dims, channels, norm, num_groups)
        self.se = SqueezeExcitation(2 * channels, se_reduction)
        self.proj = _conv1x1(spatial_dims, 2 * channels, channels)
        self.norm = make_norm(norm, spatial_dims, channels, num_groups)

    def forward(self, x_uni: torch.Tensor, x_multi: torch.Tensor) -> torch.Tensor:
        """Fuse the uni-modal and multi-modal features of one encoder output.

        Args:
            x_uni: uni-modal features ``[B, C, *spatial]``.
            x_multi: multi-modal features, same shape.

        Returns:
            Fused features ``[B, C, *spatial]``.
        """
        z = torch.cat([self.gate_uni(x_uni), self.gate_multi(x_multi)], dim=1)
        return self.norm(self.proj(self.se(z)))


class ConditionConfidence(nn.Module):
    """Per-sample confidence from the clean condition latents alone: does the auxiliary image belong to the anchor?

    Three 3x3 convolutions (the last two with stride 2) with SiLU, global average pooling and a linear layer give one
    logit per sample; ``sigmoid`` of it is the confidence. It sees neither ``x_t`` nor ``t``, so its answer is the same
    at every sampling step. Divergence is a property of the conditions, not of the noisy target: trained on genuine
    against mismatched pairs (``gate_training="correspondence"``), a network of this size found the main job's
    divergent tiles (``benchmarks/damm_gate.py``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of ``cat([z_anchor, z_aux_1, ...])``.
        channels: width of the convolutions.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: int = 32) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        self.features = nn.Sequential(
            conv(in_channels, channels, 3, padding=1),
            nn.SiLU(),
            conv(channels, channels, 3, stride=2, padding=1),
            nn.SiLU(),
            conv(channels, channels, 3, stride=2, padding=1),
            nn.SiLU(),
            pool(1),
            nn.Flatten(),
        )
        self.logit = nn.Linear(channels, 1)

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        """Confidence per sample, ``[B]`` in (0, 1), fp32.

        Args:
            conditions: ``[B, in_channels, *spatial]``.
        """
        feats = self.features(conditions)
        with fp32(conditions.device):
            return torch.sigmoid(self.logit(upcast(feats))).squeeze(-1)


class UAFM(nn.Module):
    """Uncertainty-Aware Fusion Module: cross-attention with a per-key confidence on the logits.

    Query from the uni-modal features ``x``, key/value from the fused features ``ctx`` (one shared GroupNorm),
    logits ``QK^T / sqrt(d)`` multiplied per key position j by the confidence ``u_j in (0, 1)`` (the paper's
    ``1 - U``) before the softmax, output ``x + W_o(softmax(.) V)``.

    Under mixed precision (autocast) the projections and ``QK^T`` run in the low precision while the confidence
    head, its sigmoid, the scaling of the logits by ``u`` and the softmax run in fp32 (``ddcore.precision.fp32``
    on upcast inputs); ``u`` is always fp32.

    Args:
        spatial_dims: 2 or 3.
        channels: channels C of both inputs.
        num_groups: groups of the shared GroupNorm.
        num_heads: attention heads (the official model has 1); must divide C.
        confidence_source: ``"uni"`` (official: ``u = sigmoid(Linear(GN(x)))``, blind to the auxiliary modality)
            or ``"joint"`` (``u = sigmoid(MLP([GN(x), GN(ctx)]))``, sees both streams so it can react to an
            auxiliary image that disagrees with the anchor) or ``"conditions"`` (not in the paper: one ``u`` per
            sample, the same for every token, from :class:`ConditionConfidence` on the clean condition latents, which
            :meth:`forward` then needs).
        norm_eps: GroupNorm epsilon.
        condition_channels: channels of the condition latents (``confidence_source="conditions"`` only).

    Raises:
        ValueError: for an unknown ``confidence_source`` or ``num_heads`` not dividing ``channels``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_groups: int = 32,
        num_heads: int = 1,
        confidence_source: str = "uni",
        norm_eps: float = 1e-6,
        condition_channels: int | None = None,
    ) -> None:
        super().__init__()
        if confidence_source not in CONFIDENCE_SOURCES:
            raise ValueError(f"confidence_source must be one of {CONFIDENCE_SOURCES}, got {confidence_source!r}")
        if confidence_source == "conditions" and not condition_channels:
            raise ValueError("UAFM: confidence_source 'conditions' needs condition_channels")
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the bottleneck channels {channels}")
        if channels % num_groups:
            raise ValueError(f"GroupNorm with {num_groups} groups needs channels divisible by it, got {channels}")
        self.channels = channels
        self.num_heads = num_heads
        self.confidence_source = confidence_source
        self.norm = nn.GroupNorm(num_groups, channels, eps=norm_eps)
        self.to_q = _conv1x1(spatial_dims, channels, channels)
        self.to_k = _conv1x1(spatial_dims, channels, channels)
        self.to_v = _conv1x1(spatial_dims, channels, channels)
        self.proj_out = _conv1x1(spatial_dims, channels, channels)
        self.confidence_head: nn.Module
        if confidence_source == "uni":
            self.confidence_head = nn.Linear(channels, 1)
        elif confidence_source == "conditions":
            self.confidence_head = ConditionConfidence(spatial_dims, int(condition_channels or 0))
        else:
            self.confidence_head = nn.Sequential(nn.Linear(2 * channels, channels), nn.SiLU(), nn.Linear(channels, 1))

    def confidence(self, x_norm: torch.Tensor, ctx_norm: torch.Tensor) -> torch.Tensor:
        """Per-token confidence ``u`` from the normalised inputs.

        Args:
            x_norm: ``GN(x)`` as tokens ``[B, N, C]``.
            ctx_norm: ``GN(ctx)`` as tokens ``[B, N, C]``.

        Returns:
            ``u`` of shape ``[B, N]`` in (0, 1), computed in fp32 (an fp32 island under autocast).
        """
        with fp32(x_norm.device):
            x_norm = upcast(x_norm)
            feats = x_norm if self.confidence_source == "uni" else torch.cat([x_norm, upcast(ctx_norm)], dim=-1)
            return torch.sigmoid(self.confidence_head(feats)).squeeze(-1)

    def forward(
        self,
        x: torch.Tensor,
        ctx: torch.Tensor,
        use_uncertainty: bool = True,
        conditions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attend from ``x`` to ``ctx``.

        Args:
            x: uni-modal bottleneck features ``[B, C, *spatial]`` (query and residual base).
            ctx: fused features, same shape (key and value).
            use_uncertainty: multiply the logits by ``u`` (False in the warm-up phase; ``u`` is still returned).
            conditions: the clean condition latents (needed by ``confidence_source="conditions"`` only).

        Returns:
            ``(out, u)``: ``out`` has the shape of ``x``; ``u`` is ``[B, N]`` with ``N`` the number of tokens.
        """
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        xn, cn = self.norm(x), self.norm(ctx)
        if self.confidence_source == "conditions":
            if conditions is None:
                raise ValueError("UAFM: confidence_source 'conditions' needs the condition latents")
            u = self.confidence_head(conditions)[:, None].expand(b, math.prod(spatial))
        else:
            u = self.confidence(xn.flatten(2).transpose(1, 2), cn.flatten(2).transpose(1, 2))
        h, d = self.num_heads, c // self.num_heads
        q = self.to_q(xn).reshape(b, h, d, -1).transpose(2, 3)  # B h N d
        k = self.to_k(cn).reshape(b, h, d, -1).transpose(2, 3)
        v = self.to_v(cn).reshape(b, h, d, -1).transpose(2, 3)
        scores = torch.matmul(q, k.transpose(2, 3))  # B h Nq Nk (low precision under autocast)
        with fp32(x.device):  # scaling, confidence weighting and softmax in fp32
            logits = upcast(scores) / math.sqrt(d)
            if use_uncertainty:
                logits = logits * u[:, None, None, :].to(logits.dtype)
            attn = torch.softmax(logits, dim=-1)
        out = torch.matmul(attn, v).transpose(2, 3).reshape(b, c, *spatial)
        return x + self.proj_out(out), u

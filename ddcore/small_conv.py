"""Convolutions on very small feature maps computed as one matrix product (im2col + matmul).

On a CPU, oneDNN's convolution kernels parallelise over the spatial positions and the batch. At the bottom of a
U-Net on 16x16 latents the feature maps are 4x4 (16 positions) and the layers are wide (512-1024 channels), and
there the backward pass (the weight gradient above all) runs far below the machine's matrix throughput; the same
arithmetic written as ``unfold`` + ``matmul`` runs on the BLAS/oneDNN matrix kernels instead
(``benchmarks.damm_train_levers``, the "small_conv" lever). On larger maps oneDNN's direct convolution is the
faster one, so only maps of at most ``max_pixels`` positions take the matrix path.

:func:`matmul_small_convs` swaps exact ``nn.Conv2d`` instances for :class:`SmallImageConv2d` in place (parameters,
buffers and state-dict keys unchanged), as :func:`ddcore.precision.keep_norms_fp32` does for the norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SmallImageConv2d", "matmul_small_convs"]


class SmallImageConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes maps of at most ``max_pixels`` positions as one ``unfold`` + ``matmul``.

    Only CPU tensors with stride 1, dilation 1, one group and zero padding that keeps the size take that path;
    anything else (a GPU's cuDNN kernels included), and every larger map, runs ``nn.Conv2d.forward``. Under
    autocast the input is cast to the autocast dtype before ``unfold`` (the matmul would cast the unfolded copy, nine
    times larger, otherwise).
    """

    max_pixels: int = 16

    def _matrix_path(self, x: torch.Tensor) -> bool:
        h, w = x.shape[-2:]
        kh, kw = self.kernel_size
        return (
            h * w <= self.max_pixels
            and x.device.type == "cpu"
            and x.dim() == 4
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and tuple(self.padding) == ((kh - 1) // 2, (kw - 1) // 2)
            and kh % 2 == 1
            and kw % 2 == 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` (B, C, H, W).

        Args:
            x: input batch.

        Returns:
            ``nn.Conv2d.forward(x)``, computed as a matrix product on small maps.
        """
        if not self._matrix_path(x):
            return super().forward(x)
        b, _, h, w = x.shape
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            x = x.to(torch.get_autocast_dtype(kind))
        cols = F.unfold(x, self.kernel_size, padding=self.padding)  # (B, C*kh*kw, H*W)
        n = h * w
        # one (O, C*kh*kw) x (C*kh*kw, B*H*W) product: the weight gradient is one matmul, not a batched one summed
        cols = cols.transpose(0, 1).reshape(cols.shape[1], b * n)
        weight = self.weight.reshape(self.out_channels, -1)
        if self.bias is None:
            out = torch.mm(weight, cols)
        else:
            out = torch.addmm(self.bias[:, None], weight, cols)
        return out.reshape(self.out_channels, b, n).transpose(0, 1).reshape(b, self.out_channels, h, w)


def matmul_small_convs(module: nn.Module, max_pixels: int = 16) -> nn.Module:
    """Let every exact ``nn.Conv2d`` of ``module`` compute maps of at most ``max_pixels`` positions as a matmul.

    Args:
        module: a network (changed in place).
        max_pixels: largest ``H * W`` that takes the matrix path; ``0`` leaves the module unchanged.

    Returns:
        The same ``module``.

    Raises:
        ValueError: a negative ``max_pixels``.
    """
    if max_pixels < 0:
        raise ValueError(f"max_pixels must be >= 0 (0: off), got {max_pixels}")
    if max_pixels == 0:
        return module
    for sub in module.modules():
        if type(sub) is nn.Conv2d:
            sub.__class__ = SmallImageConv2d
            sub.max_pixels = int(max_pixels)
    return module

"""Hardware limit: measured dense matrix-multiply and convolution throughput of this machine.

Run alone with ``python -m benchmarks.hardware``.
"""

from __future__ import annotations

import functools
import json

import torch

from benchmarks.timing import figure, time_call

__all__ = ["NAME", "conv_gflops", "matmul_peak_gflops", "run"]

NAME = "hardware"


@functools.cache
def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeat: int = 5) -> float:
    """Measured dense ``n x n`` matrix-multiply throughput in GFLOP/s (2 n^3 FLOPs per product).

    Args:
        dtype: element type (``torch.float32`` or ``torch.bfloat16``).
        n: matrix edge.
        repeat: timed repetitions (median reported).

    Returns:
        GFLOP/s of the fastest repetition (a peak, not a typical value) on CUDA if available, else the CPU.
    """
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best = min(time_call(lambda: torch.mm(a, b), warmup=0 if i else 2, repeat=1)[0] for i in range(repeat))
    return 2 * n**3 / best / 1e9


def conv_gflops(dtype: torch.dtype, channels: int = 256, size: int = 16, batch: int = 16) -> tuple[float, float]:
    """Throughput of a 3x3 convolution ``channels -> channels`` on ``size x size`` maps.

    Args:
        dtype: element type.
        channels: input and output channels.
        size: spatial edge.
        batch: batch size.

    Returns:
        ``(GFLOP/s, spread in GFLOP/s)``.
    """
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype)
    x = torch.randn(batch, channels, size, size, dtype=dtype)
    flops = 2 * batch * channels * channels * 9 * size * size
    with torch.no_grad():
        median, spread = time_call(lambda: conv(x), warmup=2, repeat=5)
    gflops = flops / median / 1e9
    return gflops, gflops * spread / median


def run(quick: bool = False) -> list[dict]:
    """Measure fp32/bf16 matmul and 3x3-conv throughput.

    Args:
        quick: smaller problems and fewer repeats.

    Returns:
        Figure records.
    """
    n = 1024 if quick else 2048
    figs = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        matmul_peak_gflops.cache_clear()
        peak = matmul_peak_gflops(dtype, n=n, repeat=3 if quick else 7)
        figs.append(figure(f"matmul {n}x{n} {name}", peak, "GFLOP/s", dtype=name, n=n))
        gf, spread = conv_gflops(dtype, batch=4 if quick else 16)
        figs.append(figure(f"conv3x3 256->256 @16x16 {name}", gf, "GFLOP/s", spread=spread, dtype=name))
    matmul_peak_gflops.cache_clear()
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick=False), indent=2))

"""DRDM sampling cost: time per augmentation output (Algorithm 2) starting at T' (the paper) vs running all
T = 80 recovery steps (the official code), with the full-size recovery network (K = 2 passes per step).

Official reference (spec drdm.md §3.2): about 15.4-30 s per 2D 256² output on one CPU core (80 steps x 2 passes).
The network's weights do not change the cost, so an untrained network is used.

Run: ``python -m benchmarks.drdm_sampling [--quick]``.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.memory import peak_memory_mb
from benchmarks.timing import figure, time_call
from drdm.diffusion import DeformationDiffusion
from drdm.networks import RecoveryNet
from drdm.sampler import DRDMSampler

__all__ = ["NAME", "run"]

NAME = "drdm_sampling"


def run(quick: bool = False) -> list[dict]:
    """Time one augmentation output per setting.

    Args:
        quick: 2D 64² only (well under a minute).

    Returns:
        Figures.
    """
    figures: list[dict] = []
    cases = [((64, 64), 32)] if quick else [((256, 256), 32), ((64, 64, 64), 32)]
    for shape, t_prime in cases:
        torch.manual_seed(0)
        net = RecoveryNet(len(shape)).eval()
        diffusion = DeformationDiffusion()
        image = torch.rand(1, 1, *shape)
        label = "x".join(str(s) for s in shape)
        with torch.no_grad():
            net(image, torch.zeros(1, dtype=torch.long))  # warm-up (allocator, kernels) outside the timings
        for start in ("t_prime", "all"):
            sampler = DRDMSampler(net, diffusion, start=start, folding_threshold=None)
            gen = torch.Generator().manual_seed(0)
            median, spread = time_call(lambda s=sampler, g=gen, x=image, tp=t_prime: s.sample(x, tp, generator=g), 0, 1)
            ref = 15.4 if shape == (256, 256) and start == "all" else None
            figures.append(
                figure(
                    f"drdm augmentation output {len(shape)}D {label} T'={t_prime} ({start})",
                    median,
                    "s",
                    spread=spread,
                    reference=ref,
                    reference_label="official DRDM_augment, 2D 256^2, 80 steps x 2 passes, CPU" if ref else None,
                    shape=list(shape),
                    t_prime=t_prime,
                    start=start,
                    recovery_steps=len(sampler.recovery_levels(t_prime)),
                    network_passes=2 * len(sampler.recovery_levels(t_prime)),
                    threads=torch.get_num_threads(),
                )
            )
        if not quick and len(shape) == 3:
            sampler = DRDMSampler(net, diffusion, start="t_prime", folding_threshold=None)
            peak = peak_memory_mb(lambda s=sampler, x=image: s.sample(x, 8))
            figures.append(
                figure(f"drdm augmentation output 3D {label} peak memory", peak, "MiB", shape=list(shape), t_prime=8)
            )
    return figures


def main() -> None:
    """Print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()

"""``RandDRDMDeformd`` on the fly (issue 19 part 4): seconds per call for a 2D 256² slice and a 3D 128x128x32 volume
(image + label), with a fresh field per call, a fresh field with strided recovery, and the field bank (first call
= bank generation, a bank hit, and the amortised cost per call over one refresh period); plus the inverse
(``Invertd`` path: fixed-point inverse field and two warps).

The network is the bundle's (``bundle/configs/drdm_common.json`` ``network_def``: channels 10/20/40, 2 recursions,
instance norm, channels-last), untrained: the cost does not depend on the weights, but the fields do, so these are
speed figures only. Sampler settings are the config's ``sampler_kwargs`` (folding guard 1 %, 3 retries, batch 4).
Targets (issue 19): <= 1 s per 2D 256² call and <= 5 s per 3D 128x128x32 call on 2 cores.

Run: ``python -m benchmarks run --only drdm_augment_speed [--quick]`` (quick: T' = 4, one 2D 64² case, a plumbing
check; full: T' = 4 and 16, 2D 256² and 3D 128x128x32).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchmarks.timing import figure, time_call
from drdm.diffusion import DeformationDiffusion
from drdm.networks import RecoveryNet
from drdm.sampler import DRDMSampler
from drdm.transforms import RandDRDMDeformd

__all__ = ["NAME", "run"]

NAME = "drdm_augment_speed"

CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "drdm_common.json"
BANK_SIZE = 2
REFRESH_EVERY = 16


def _config() -> tuple[dict, dict, dict]:
    """``network_def``, ``diffusion`` and ``sampler_kwargs`` of the bundle config (references resolved by hand)."""
    cfg = json.loads(CONFIG.read_text())
    net = {k: v for k, v in cfg["network_def"].items() if k not in ("_target_", "spatial_dims", "in_channels")}
    diff = {k: v for k, v in cfg["diffusion"].items() if k not in ("_target_", "num_timesteps")}
    diff["num_timesteps"] = cfg["num_timesteps"]
    return net, diff, dict(cfg["sampler_kwargs"])


def _item(shape: tuple[int, ...]) -> dict:
    grids = torch.meshgrid(*[torch.linspace(0, 3, s) for s in shape], indexing="ij")
    image = sum(torch.sin(2 * g + i) for i, g in enumerate(grids))[None] * 100.0
    label = ((grids[0] * 3).long() * 2 + (grids[1] * 2).long() % 2)[None].to(torch.uint8)
    return {"image": image, "label": label}


def _case(shape: tuple[int, ...], t_prime: int, threads: int) -> list[dict]:
    net_kw, diff_kw, sampler_kw = _config()
    d = len(shape)
    torch.manual_seed(0)
    network = RecoveryNet(d, 1, **net_kw).eval()
    diffusion = DeformationDiffusion(**diff_kw)
    label = "x".join(str(s) for s in shape)
    item = _item(shape)
    params = {"shape": list(shape), "t_prime": t_prime, "threads": threads, "network": net_kw, **sampler_kw}
    figures = []

    def per_call(name: str, seconds: float, spread: float | None = None, **extra: object) -> None:
        figures.append(
            figure(f"RandDRDMDeformd {d}D {label} T'={t_prime}: {name}", seconds, "s", spread, **params, **extra)
        )

    for stride in (1, 2):
        sampler = DRDMSampler(network, diffusion, recovery_stride=stride, **sampler_kw)
        fresh = RandDRDMDeformd("image", sampler, label_keys="label", t_prime=t_prime)
        fresh.set_random_state(seed=0)
        median, spread = time_call(lambda f=fresh: f(dict(item)), warmup=0, repeat=2 if d == 2 else 1)
        per_call(f"fresh field per call, recovery_stride={stride}", median, spread, recovery_stride=stride)
    sampler = DRDMSampler(network, diffusion, **sampler_kw)
    bank = RandDRDMDeformd(
        "image", sampler, label_keys="label", t_prime=t_prime, bank_size=BANK_SIZE, refresh_every=REFRESH_EVERY
    )
    bank.set_random_state(seed=0)
    times = []
    out = None
    for _ in range(REFRESH_EVERY):
        start = time.perf_counter()
        out = bank(dict(item))
        times.append(time.perf_counter() - start)
    bank_params = {"bank_size": BANK_SIZE, "refresh_every": REFRESH_EVERY}
    per_call("bank, first call (generates the bank)", times[0], **bank_params)
    per_call("bank hit (median)", sorted(times[1:])[len(times[1:]) // 2], **bank_params)
    per_call(f"bank, amortised over {REFRESH_EVERY} calls (one refresh period)", sum(times) / len(times), **bank_params)
    assert out is not None
    median, spread = time_call(lambda o=out: bank.inverse(copy.deepcopy(o)), warmup=1, repeat=3)
    per_call("inverse (20 fixed-point iterations + warps)", median, spread, inverse_iterations=bank.inverse_iterations)
    return figures


def run(quick: bool = False) -> list[dict]:
    """Seconds per ``RandDRDMDeformd`` call, 2D 256² and 3D 128x128x32.

    Args:
        quick: T' = 4, 2D 64² only.

    Returns:
        Figures.
    """
    threads = torch.get_num_threads()
    figures: list[dict] = []
    shapes = ((64, 64),) if quick else ((256, 256), (128, 128, 32))  # quick: a plumbing check, not a result
    for t_prime in (4,) if quick else (4, 16):
        for shape in shapes:
            figures += _case(shape, t_prime, threads)
    return figures


def main() -> None:
    """Print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()

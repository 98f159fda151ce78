"""DRDM deformation-quality claim after a short CPU training (issue §7).

The paper claims deformations of "over 10 % image size" with "< 1 %" negative Jacobian determinants. This
benchmark trains the recovery network briefly on the shared CT and brain volumes (random patches, spec §2.4
augmentation), then runs Algorithm 2 on each whole volume for several start levels T' (no folding guard) and
reports the mean and 99th-percentile displacement (% of the longest physical edge) and the folding fraction of
the recovered field φ, next to the random starting field Ψ_{T'}. A few hundred CPU iterations are far from the
official ~800 GPU-hours, so this measures what *our* short training reaches, not the paper's model.

Run: ``python -m benchmarks.drdm_claims [--quick]`` (full: several minutes; needs the shared data).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandSpatialCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from benchmarks.timing import figure
from data_prep.shared import shared_data_dir
from drdm.diffusion import DeformationDiffusion
from drdm.io import deformation_stats
from drdm.networks import RecoveryNet
from drdm.sampler import DRDMSampler
from drdm.trainer import DRDMTrainer, augmentation_transforms, loss_terms

__all__ = ["NAME", "run"]

NAME = "drdm_claims"


def _volumes(quick: bool) -> list[dict]:
    root = shared_data_dir()
    if root is None:
        return []
    items = []
    if (root / "ct" / "ct.nii.gz").is_file():
        items.append({"id": "ct", "image": str(root / "ct" / "ct.nii.gz"), "pixdim": 6.0 if quick else 3.0})
    brain = root / "brats" / "TCGA-DU-7294" / "t1.nii.gz"
    if brain.is_file() and not quick:
        items.append({"id": "brain_t1", "image": str(brain), "pixdim": 3.0})
    return items


def _load(item: dict) -> dict:
    pipeline = Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            Spacingd("image", pixdim=[item["pixdim"]] * 3),
            ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
            EnsureTyped("image", dtype=torch.float32, track_meta=True),
        ]
    )
    return pipeline({"image": item["image"]})


def run(
    quick: bool = False,
    iterations: int = 150,
    t_primes: tuple[int, ...] = (8, 16, 32, 48),
    volumes: tuple[str, ...] = ("ct", "brain_t1"),
) -> list[dict]:
    """Train briefly, then measure displacement and folding per T' (progress is logged to stderr).

    Args:
        quick: 3 iterations on a 6 mm CT, T' in {4, 8} (plumbing check, well under a minute).
        iterations: training iterations (full mode).
        t_primes: start levels (full mode).
        volumes: which shared volumes to use (``ct``, ``brain_t1``).

    Returns:
        Figures (empty when the shared data is absent).

    Raises:
        ValueError: a volume name other than ``ct`` or ``brain_t1``.
    """
    unknown = sorted(set(volumes) - {"ct", "brain_t1"})
    if unknown:
        raise ValueError(f"unknown volume(s) {unknown}; choose from 'ct' and 'brain_t1'")
    items = [item for item in _volumes(quick) if item["id"] in volumes]
    if not items:
        return []
    torch.manual_seed(0)
    volumes = [(item["id"], _load(item)) for item in items]
    roi = [32, 32, 8] if quick else [48, 48, 24]
    iters, levels = (3, (4, 8)) if quick else (iterations, t_primes)
    crop = Compose(
        [
            SpatialPadd("image", roi),
            RandSpatialCropd("image", roi, random_size=False),
            *augmentation_transforms(3, "image", roi_size=roi),
            EnsureTyped("image", dtype=torch.float32, track_meta=False),
        ]
    )
    data = [{"image": vol["image"]} for _, vol in volumes] * max(1, iters)
    loader = DataLoader(Dataset(data, crop), batch_size=2, shuffle=True, num_workers=0)
    net = RecoveryNet(3)
    diffusion = DeformationDiffusion()
    optimizer = torch.optim.Adam(net.parameters(), 1e-4 if quick else 1e-3)
    trainer = DRDMTrainer("cpu", 1, loader, net, optimizer, diffusion, epoch_length=iters)
    losses: list[dict] = []

    def _log(engine: DRDMTrainer) -> None:
        losses.append(loss_terms(engine.state.output))
        if engine.state.iteration % 10 == 0:
            print(
                f"[drdm_claims] iteration {engine.state.iteration}/{iters}: {losses[-1]}", file=sys.stderr, flush=True
            )

    trainer.add_event_handler(Events.ITERATION_COMPLETED, _log)
    start = time.perf_counter()
    trainer.run()
    train_s = time.perf_counter() - start
    tail = losses[-min(20, len(losses)) :]
    figures = [
        figure(
            "drdm short CPU training: final mean cosine (angle term)",
            sum(x["loss_ang"] for x in tail) / len(tail),
            "cos",
            reference=-0.9,
            reference_label="official converged CMR checkpoint (spec §2.3)",
            iterations=iters,
            seconds=train_s,
            roi=roi,
            first_loss=losses[0],
            last_loss=losses[-1],
        )
    ]
    sampler = DRDMSampler(net, diffusion, folding_threshold=None)
    for name, vol in volumes:
        image = vol["image"].as_tensor()[None]
        spacing = [float(s) for s in vol["image"].pixdim[:3]]
        for t_prime in levels:
            gen = torch.Generator().manual_seed(t_prime)
            begin = time.perf_counter()
            res = sampler.sample(image, t_prime, generator=gen)
            seconds = time.perf_counter() - begin
            rec = deformation_stats(res.ddf[0], spacing)
            rnd = deformation_stats(res.random_ddf[0], spacing)
            figures.append(
                figure(
                    f"drdm {name} T'={t_prime}: mean displacement of recovered field",
                    rec["mean_displacement_pct"],
                    "% of image size",
                    reference=10.0,
                    reference_label="paper: 'over 10 % image size deformation scale'",
                    p99_pct=rec["p99_displacement_pct"],
                    mean_mm=rec["mean_displacement_mm"],
                    folding_pct=100 * rec["folding_fraction"],
                    random_field_mean_pct=rnd["mean_displacement_pct"],
                    random_field_folding_pct=100 * rnd["folding_fraction"],
                    shape=list(image.shape[2:]),
                    seconds=seconds,
                )
            )
            print(f"[drdm_claims] {figures[-1]}", file=sys.stderr, flush=True)
            figures.append(
                figure(
                    f"drdm {name} T'={t_prime}: folding of recovered field",
                    100 * rec["folding_fraction"],
                    "%",
                    reference=1.0,
                    reference_label="paper: negative Jacobian rate < 1 %",
                )
            )
    return figures


def main() -> None:
    """Print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--t-primes", type=int, nargs="+", default=[8, 16, 32, 48])
    parser.add_argument("--volumes", nargs="+", default=["ct", "brain_t1"])
    args = parser.parse_args()
    figures = run(args.quick, args.iterations, tuple(args.t_primes), tuple(args.volumes))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

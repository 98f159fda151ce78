"""The DRDM model of the downstream benchmarks (few-shot segmentation, registration): train, load, sample, probe.

:func:`train_drdm` trains the bundle's 2D ``RecoveryNet`` (``network_def``, ``diffusion`` and ``loss`` of
``bundle/configs/drdm_common.json`` / ``drdm_train.json``) with :class:`drdm.trainer.DRDMTrainer` on random crops
of unlabelled slices; :func:`load_or_train_drdm` takes weights from an environment variable instead;
:func:`make_sampler` builds the benchmarks' sampler; :func:`bank_statistics` and :func:`recovery_effect` say what
the fields are (size and folding of a ``RandDRDMDeformd`` bank; how much the learned recovery changes the random
start field).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped, RandSpatialCropd, ScaleIntensityRangePercentilesd, SpatialPadd

from ddcore.checkpoints import load_checked_state_dict
from drdm.diffusion import DeformationDiffusion
from drdm.io import deformation_stats
from drdm.losses import DRDMLoss
from drdm.networks import RecoveryNet
from drdm.sampler import DRDMSampler
from drdm.trainer import DRDMTrainer, augmentation_transforms
from drdm.transforms import RandDRDMDeformd

__all__ = [
    "bank_statistics",
    "drdm_config",
    "load_or_train_drdm",
    "make_sampler",
    "recovery_effect",
    "train_drdm",
]

CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "drdm_common.json"
TRAIN_CONFIG = CONFIG.with_name("drdm_train.json")


def _scalar(value: Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def drdm_config() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``network_def``, ``diffusion``, ``sampler_kwargs`` and the training ``loss`` of the bundle configs."""
    cfg = json.loads(CONFIG.read_text())
    net = {k: v for k, v in cfg["network_def"].items() if k not in ("_target_", "spatial_dims", "in_channels")}
    diff = {k: v for k, v in cfg["diffusion"].items() if k not in ("_target_", "num_timesteps")}
    diff["num_timesteps"] = cfg["num_timesteps"]
    loss = {k: v for k, v in json.loads(TRAIN_CONFIG.read_text())["loss"].items() if k != "_target_"}
    return net, diff, dict(cfg["sampler_kwargs"]), loss


def train_drdm(
    images: torch.Tensor, iterations: int, roi: list[int], batch: int, seed: int = 0, lr: float = 1e-3
) -> tuple[RecoveryNet, DeformationDiffusion, dict[str, Any]]:
    """Train the bundle's 2D recovery network on ``images`` ``[N, 1, H, W]`` with the project's trainer.

    Random ``roi`` crops, spec §2.4 augmentation (:func:`drdm.trainer.augmentation_transforms`), the config's
    network, diffusion and loss, Adam at ``lr``, ``iterations`` iterations of ``batch`` crops.

    Returns:
        The network (eval mode), the diffusion, and what the training did.
    """
    net_kw, diff_kw, _, loss_kw = drdm_config()
    torch.manual_seed(seed)
    net = RecoveryNet(2, 1, **net_kw)
    diffusion = DeformationDiffusion(**diff_kw)
    crop = Compose(
        [
            ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
            SpatialPadd("image", roi),
            RandSpatialCropd("image", roi, random_size=False),
            *augmentation_transforms(2, "image", roi_size=roi),
            EnsureTyped("image", dtype=torch.float32, track_meta=False),
        ]
    ).set_random_state(seed)
    repeat = max(1, math.ceil(iterations * batch / len(images)))
    loader = DataLoader(
        Dataset([{"image": img} for img in images] * repeat, crop),
        batch_size=batch,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr)
    trainer = DRDMTrainer("cpu", 1, loader, net, optimizer, diffusion, DRDMLoss(**loss_kw), epoch_length=iterations)
    start = time.perf_counter()
    trainer.run()
    out = trainer.state.output
    info = {
        "drdm_iterations": iterations,
        "drdm_roi": list(roi),
        "drdm_batch": batch,
        "drdm_lr": lr,
        "drdm_train_seconds": round(time.perf_counter() - start, 2),
        "drdm_final_loss": round(_scalar(out["loss"]), 4),
        "drdm_final_cosine": round(_scalar(out.get("loss_ang", float("nan"))), 4),
    }
    return net.eval(), diffusion, info


def load_or_train_drdm(
    images: torch.Tensor, settings: dict[str, Any], env: str = "DRDM_FEWSHOT_MODEL"
) -> tuple[RecoveryNet, DeformationDiffusion, dict[str, Any]]:
    """The weights at ``$env`` when set (a ``RecoveryNet(2, 1, **network_def)`` state dict), else :func:`train_drdm`."""
    path = os.environ.get(env)
    if path:
        net_kw, diff_kw, _, _ = drdm_config()
        net = RecoveryNet(2, 1, **net_kw)
        load_checked_state_dict(net, path, "DRDM recovery network (2D)", key="model")
        return net.eval(), DeformationDiffusion(**diff_kw), {"drdm_model": str(path)}
    return train_drdm(images, settings["drdm_iterations"], settings["drdm_roi"], settings["drdm_batch"])


def make_sampler(network: RecoveryNet, diffusion: DeformationDiffusion, settings: dict[str, Any]) -> DRDMSampler:
    """The config's sampler settings, batch 8, the benchmark's ``recovery_stride``."""
    sampler_kw = {**drdm_config()[2], "batch_size": 8, "recovery_stride": settings["recovery_stride"]}
    return DRDMSampler(network, diffusion, **sampler_kw)


def bank_statistics(arm: Compose) -> dict[int, list[dict[str, float]]]:
    """:func:`drdm.io.deformation_stats` (voxel units) of every field in the arm's DRDM banks, per start level
    (:meth:`drdm.transforms.RandDRDMDeformd.bank_fields`); ``{}`` for an arm without a DRDM bank."""
    drdm = [t for t in arm.transforms if isinstance(t, RandDRDMDeformd)]
    if not drdm:
        return {}
    return {
        level: [deformation_stats(f, [1.0, 1.0]) for image_fields in per_image for f in image_fields]
        for level, per_image in drdm[0].bank_fields().items()
    }


def recovery_effect(
    sampler: DRDMSampler, image: torch.Tensor, levels: list[int], outputs: int, seed: int = 0
) -> dict[int, tuple[float, float]]:
    """Mean displacement (% of the slice size) of the random start field and of the recovered field, per level.

    Args:
        sampler: the benchmark's sampler.
        image: one slice ``[1, H, W]`` in [0, 1].
        levels: start levels.
        outputs: draws per level (the same draws give both figures).
        seed: seed of the draws.

    Returns:
        ``{T': (random start %, recovered %)}``; equal figures mean the recovery changed nothing.
    """
    results = sampler.augment(image[None], levels, outputs, None, torch.Generator().manual_seed(seed))
    out: dict[int, tuple[float, float]] = {}
    for i, level in enumerate(levels):
        part = results[i * outputs : (i + 1) * outputs]
        start = [deformation_stats(r.random_ddf[0], [1.0, 1.0])["mean_displacement_pct"] for r in part]
        recovered = [deformation_stats(r.ddf[0], [1.0, 1.0])["mean_displacement_pct"] for r in part]
        out[int(level)] = (statistics.fmean(start), statistics.fmean(recovered))
    return out

"""Few-shot 2D organ segmentation on axial CT slices with and without DRDM augmentation (issue 19 part 1).

Data: the shared upper-abdomen CT (``ct/{ct,seg}.nii.gz``, 122x101x30, 3 mm, RAS); its axial slices (the third
array axis) are the samples. Labels: the ``N_LABELS`` = 8 most frequent foreground classes of the whole volume,
mapped to 1..8 by frequency rank (rank 1 = liver, class 5); every other class is background. Images: HU windowed
to [-250, 350] and scaled to [0, 1], padded to 128x112 (quick: every second pixel, padded to 64x64).

Split (:func:`fewshot_split`): ``K`` training slices drawn without replacement from a seeded generator; the test
set is every slice at least ``GAP`` = 3 slices (9 mm) away from all training slices, so neither a training slice
nor its neighbours within 2 slices (6 mm) is ever tested. The arms of one seed share the split, the network
initialisation and the order of the training draws.

Network: MONAI ``UNet`` (2D, channels 16/32/64/128, one residual unit, instance norm), ``DiceCELoss`` (softmax,
one-hot targets), Adam 1e-3, the same number of iterations (batches of 4 slices drawn with replacement) in every
arm. Arms:

- ``none``: no augmentation.
- ``monai``: ``RandAffined`` (prob 0.8, rotation ±15°, scaling ±10 %, translation ±8 px) then ``Rand2DElasticd``
  (prob 0.5, control spacing 16 px, magnitude 1-3), bilinear images, nearest labels, zero padding.
- ``drdm``: :class:`drdm.transforms.RandDRDMDeformd` (prob 0.8, T' in {16, 32, 48}, field bank of 8 fields per
  image and level, never refreshed, sampler ``recovery_stride`` 4, the config's folding guard), labels nearest.
  T' 16-48 is the range the spec's measurement of the official model calls moderate (folding < 1 % up to 32-48);
  the earlier T' {8, 16} gave fields of about 1 % of the slice size, far smaller than the MONAI arm's.
- ``both``: ``drdm`` then ``monai``.

The DRDM model (:mod:`benchmarks.drdm_model`): the bundle's 2D ``RecoveryNet`` (``network_def`` and ``diffusion`` of
``bundle/configs/drdm_common.json``) trained inside the benchmark with :class:`drdm.trainer.DRDMTrainer` for
``drdm_iterations`` iterations on random 64² crops of all CT slices (images only, never the labels: the paper's
unlabelled setting), the config's loss and spec §2.4 augmentation, Adam 1e-3; or the weights at
``$DRDM_FEWSHOT_MODEL`` (a ``RecoveryNet(2, 1, **network_def)`` state dict, e.g. a 2D bundle training's
``model.pt``).

Figures: mean Dice over the 8 labels (MONAI ``DiceMetric``, background excluded, labels absent from a test slice
ignored), per-label Dice of the 3 largest organs, mean ± sd over seeds (``sd`` and per-seed values in ``params``),
the **paired** difference of every augmented arm to ``monai`` (per seed, same split and initialisation: the split
dominates the unpaired sd at K = 1), augmentation seconds per sample, and the DRDM bank fields' mean / p99
displacement and folding per start level, and what the learned recovery does
(:func:`benchmarks.drdm_model.recovery_effect`: mean displacement of the random start field against the
recovered field, same draws).

Run: ``python -m benchmarks run --only drdm_fewshot [--quick]``. Full: K = 1, 3, 5 x 3 seeds x 4 arms x 250
iterations after 2000 DRDM iterations (cosine term about -0.4: the recovery removes only a small part of the
random field, see the recovery figures): 1078 s on 2 idle AMD EPYC cores (record of 2026-12-04; the DRDM training
416 s of it); quick (K = 1, 2 seeds, a few iterations, 64²): a plumbing check.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandAffined,
    SpatialPadd,
)

from benchmarks.drdm_model import bank_statistics, load_or_train_drdm, make_sampler, recovery_effect
from benchmarks.timing import figure
from data_prep.shared import shared_data_dir
from drdm.sampler import DRDMSampler
from drdm.transforms import RandDRDMDeformd

__all__ = [
    "ARMS",
    "FULL",
    "GAP",
    "NAME",
    "N_LABELS",
    "QUICK",
    "ct_slices",
    "evaluate",
    "fewshot_split",
    "make_arm",
    "map_labels",
    "paired_differences",
    "run",
    "top_labels",
    "train_segmenter",
]

NAME = "drdm_fewshot"

ARMS = ("none", "monai", "drdm", "both")
GAP = 3
N_LABELS = 8
HU_WINDOW = (-250.0, 350.0)
QUICK: dict[str, Any] = {
    "ks": [1],
    "seeds": [0, 1],
    "subsample": 2,
    "pad": [64, 64],
    "steps": 4,
    "batch": 2,
    "channels": [8, 16, 32],
    "drdm_iterations": 3,
    "drdm_roi": [32, 32],
    "drdm_batch": 2,
    "t_prime": [4],
    "bank_size": 2,
    "recovery_stride": 2,
    "translate_px": 4,
    "elastic_spacing": 8,
}
FULL: dict[str, Any] = {
    "ks": [1, 3, 5],
    "seeds": [0, 1, 2],
    "subsample": 1,
    "pad": [128, 112],
    "steps": 250,
    "batch": 4,
    "channels": [16, 32, 64, 128],
    "drdm_iterations": 2000,
    "drdm_roi": [64, 64],
    "drdm_batch": 4,
    "t_prime": [16, 32, 48],
    "bank_size": 8,
    "recovery_stride": 4,
    "translate_px": 8,
    "elastic_spacing": 16,
}


def _log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- data
def fewshot_split(n_slices: int, k: int, gap: int, seed: int) -> tuple[list[int], list[int]]:
    """Training and test slice indices: ``k`` seeded training slices, test = slices ``>= gap`` from all of them.

    Args:
        n_slices: slices in the volume.
        k: training slices (drawn without replacement by ``numpy.random.default_rng(seed)``).
        gap: minimum distance (in slices) of a test slice to every training slice (>= 1; 1 only excludes the
            training slices themselves).
        seed: seed of the draw.

    Returns:
        ``(train, test)``, sorted lists of slice indices.

    Raises:
        ValueError: ``k`` outside ``[1, n_slices]``, ``gap < 1``, or no slice left for testing.
    """
    if isinstance(n_slices, bool) or int(n_slices) != n_slices or n_slices < 1:
        raise ValueError(f"fewshot_split: n_slices must be an integer >= 1, got {n_slices!r}.")
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n_slices:
        raise ValueError(f"fewshot_split: k must be an integer in [1, {n_slices}], got {k!r}.")
    if isinstance(gap, bool) or int(gap) != gap or gap < 1:
        raise ValueError(f"fewshot_split: gap must be an integer >= 1, got {gap!r}.")
    rng = np.random.default_rng(int(seed))
    train = sorted(int(z) for z in rng.choice(int(n_slices), size=int(k), replace=False))
    test = [z for z in range(int(n_slices)) if min(abs(z - t) for t in train) >= gap]
    if not test:
        raise ValueError(f"fewshot_split: no test slice is {gap} slices from the training slices {train}.")
    return train, test


def top_labels(seg: np.ndarray, n: int) -> list[int]:
    """The ``n`` most frequent non-zero label values of ``seg`` (ties: smaller value first).

    Args:
        seg: integer label map.
        n: how many.

    Returns:
        Label values, most frequent first.
    """
    values, counts = np.unique(np.asarray(seg).astype(np.int64), return_counts=True)
    order = sorted((-c, v) for v, c in zip(values.tolist(), counts.tolist()) if v != 0)
    return [v for _, v in order[:n]]


def map_labels(seg: np.ndarray, labels: list[int]) -> np.ndarray:
    """Map ``labels[i]`` to ``i + 1`` and every other value to 0 (uint8)."""
    seg = np.asarray(seg).astype(np.int64)
    out = np.zeros(seg.shape, dtype=np.uint8)
    for rank, value in enumerate(labels, start=1):
        out[seg == value] = rank
    return out


def ct_slices(
    root: Path, settings: dict[str, Any], n_labels: int = N_LABELS
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Axial slices of the shared CT: images ``[Z, 1, H, W]`` in [0, 1], labels ``[Z, 1, H, W]`` (float, 0..N).

    Args:
        root: the shared data folder (holding ``ct/ct.nii.gz`` and ``ct/seg.nii.gz``).
        settings: ``subsample`` (in-plane stride) and ``pad`` (padded slice size).
        n_labels: organs kept (the most frequent).

    Returns:
        Images, labels and the kept class ids (rank order).
    """
    ct = np.asarray(nib.load(str(root / "ct" / "ct.nii.gz")).dataobj, dtype=np.float32)
    seg = np.asarray(nib.load(str(root / "ct" / "seg.nii.gz")).dataobj)
    labels = top_labels(seg, n_labels)
    step = int(settings["subsample"])
    lo, hi = HU_WINDOW
    img = np.clip((ct[::step, ::step] - lo) / (hi - lo), 0.0, 1.0)
    lab = map_labels(seg[::step, ::step], labels).astype(np.float32)
    images = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, 0)))[:, None]
    segs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(lab, -1, 0)))[:, None]
    pad = SpatialPadd(["image", "label"], settings["pad"])
    out = [pad({"image": i, "label": s}) for i, s in zip(images, segs)]
    images = torch.stack([torch.as_tensor(o["image"]) for o in out])
    segs = torch.stack([torch.as_tensor(o["label"]) for o in out])
    return images.float(), segs.float(), labels


# ---------------------------------------------------------------------------------------------------- arms
def _monai_transforms(settings: dict[str, Any]) -> list:
    keys, modes = ["image", "label"], ("bilinear", "nearest")
    shift = float(settings["translate_px"])
    return [
        RandAffined(
            keys,
            prob=0.8,
            rotate_range=math.pi / 12,
            scale_range=0.1,
            translate_range=(shift, shift),
            mode=modes,
            padding_mode="zeros",
        ),
        Rand2DElasticd(
            keys,
            spacing=(settings["elastic_spacing"],) * 2,
            magnitude_range=(1.0, 3.0),
            prob=0.5,
            mode=modes,
            padding_mode="zeros",
        ),
    ]


def make_arm(name: str, sampler: DRDMSampler | None, settings: dict[str, Any]) -> Compose | None:
    """The augmentation of an arm (``None`` for ``"none"``); ``sampler`` is needed by ``drdm`` and ``both``.

    Raises:
        ValueError: an unknown arm, or a DRDM arm without a sampler.
    """
    if name not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {name!r}.")
    if name == "none":
        return None
    parts: list = []
    if name in ("drdm", "both"):
        if sampler is None:
            raise ValueError(f"arm {name!r} needs a DRDM sampler.")
        parts.append(
            RandDRDMDeformd(
                "image",
                sampler,
                label_keys="label",
                t_prime=list(settings["t_prime"]),
                prob=0.8,
                bank_size=settings["bank_size"],
                refresh_every=0,
            )
        )
    if name in ("monai", "both"):
        parts += _monai_transforms(settings)
    return Compose(parts)


# ---------------------------------------------------------------------------------------------------- train / test
def train_segmenter(
    images: torch.Tensor,
    labels: torch.Tensor,
    train_idx: list[int],
    augment: Callable | None,
    settings: dict[str, Any],
    seed: int,
    n_labels: int = N_LABELS,
) -> tuple[UNet, float]:
    """Train a 2D MONAI ``UNet`` with DiceCE for ``settings["steps"]`` iterations on the training slices.

    Every iteration draws ``settings["batch"]`` training slices with replacement (seeded) and augments each with
    ``augment`` (seeded by ``seed`` at the start).

    Returns:
        The network (eval mode) and the augmentation seconds per sample.
    """
    torch.manual_seed(seed)
    channels = tuple(settings["channels"])
    net = UNet(2, 1, n_labels + 1, channels, (2,) * (len(channels) - 1), num_res_units=1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    if augment is not None:
        augment.set_random_state(seed)
    draws = torch.Generator().manual_seed(seed)
    aug_seconds, samples = 0.0, 0
    net.train()
    for _ in range(int(settings["steps"])):
        picks = torch.randint(0, len(train_idx), (int(settings["batch"]),), generator=draws).tolist()
        xs, ys = [], []
        for p in picks:
            item = {"image": images[train_idx[p]], "label": labels[train_idx[p]]}
            if augment is not None:
                start = time.perf_counter()
                item = augment(item)
                aug_seconds += time.perf_counter() - start
            samples += 1
            xs.append(torch.as_tensor(item["image"]).float())
            ys.append(torch.as_tensor(item["label"]).float())
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(torch.stack(xs)), torch.stack(ys))
        loss.backward()
        optimizer.step()
    return net.eval(), aug_seconds / max(samples, 1)


@torch.no_grad()
def evaluate(
    net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, test_idx: list[int], n_labels: int = N_LABELS
) -> np.ndarray:
    """Per-label Dice ``[n_labels]`` over the test slices (``DiceMetric``; NaN for a label absent from all)."""
    pred = net(images[test_idx]).argmax(1, keepdim=True)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    scores = metric(one_hot(pred, n_labels + 1), one_hot(labels[test_idx].long(), n_labels + 1))
    scores = scores.numpy()
    with np.errstate(invalid="ignore"):
        present = ~np.isnan(scores)
        return np.where(present.any(0), np.nansum(scores, 0) / np.maximum(present.sum(0), 1), np.nan)


def _summary(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return float("nan"), float("nan")
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


def paired_differences(per_seed: dict[str, list[float]], reference: str = "monai") -> dict[str, list[float]]:
    """Per-seed ``arm - reference`` differences for every arm but ``reference`` and ``none`` (same splits per seed).

    The arms of one seed share the split and the initialisation, so the paired difference removes the split's
    share of the spread (at K = 1 the seed sd of one arm is about 0.1 Dice, mostly from which slice was drawn).
    """
    ref = per_seed[reference]
    return {
        arm: [a - b for a, b in zip(values, ref)] for arm, values in per_seed.items() if arm not in (reference, "none")
    }


def run(quick: bool = False) -> list[dict]:
    """Few-shot segmentation Dice per arm and K (one note figure when the shared CT is absent).

    Args:
        quick: K = 1, 2 seeds, a few iterations, 64² slices.

    Returns:
        Figure records.
    """
    root = shared_data_dir()
    if root is None or not (root / "ct" / "ct.nii.gz").is_file() or not (root / "ct" / "seg.nii.gz").is_file():
        return [figure("drdm_fewshot: shared CT absent, nothing measured", 0.0, "")]
    settings = QUICK if quick else FULL
    images, labels, class_ids = ct_slices(root, settings)
    net, diffusion, drdm_info = load_or_train_drdm(images, settings)
    _log(f"DRDM model: {drdm_info}")
    sampler = make_sampler(net, diffusion, settings)
    common = {"gap_slices": GAP, "n_labels": N_LABELS, "class_ids": class_ids, "threads": torch.get_num_threads()}
    common.update({k: settings[k] for k in ("steps", "batch", "channels", "pad", "subsample", "t_prime")})
    common.update({"bank_size": settings["bank_size"], "recovery_stride": settings["recovery_stride"], **drdm_info})
    figures: list[dict] = []
    aug_time: dict[str, list[float]] = {a: [] for a in ARMS}
    bank: dict[int, list[dict[str, float]]] = {}
    for k in settings["ks"]:
        scores: dict[str, list[np.ndarray]] = {a: [] for a in ARMS}
        for seed in settings["seeds"]:
            train_idx, test_idx = fewshot_split(len(images), k, GAP, seed)
            for arm_name in ARMS:
                arm = make_arm(arm_name, sampler, settings)
                seg_net, seconds = train_segmenter(images, labels, train_idx, arm, settings, seed)
                dice = evaluate(seg_net, images, labels, test_idx)
                scores[arm_name].append(dice)
                if arm is not None:
                    aug_time[arm_name].append(seconds)
                    for level, stats in bank_statistics(arm).items():
                        bank.setdefault(level, []).extend(stats)
                _log(f"K={k} seed={seed} {arm_name}: mean Dice {np.nanmean(dice):.4f}, aug {seconds * 1e3:.1f} ms")
        seed_means = {a: [float(np.nanmean(s)) for s in scores[a]] for a in ARMS}
        for arm_name in ARMS:
            per_seed = seed_means[arm_name]
            mean, sd = _summary(per_seed)
            params = {"k": k, "arm": arm_name, "seeds": settings["seeds"], "sd": sd, "per_seed": per_seed, **common}
            figures.append(figure(f"fewshot CT K={k} {arm_name}: mean Dice ({N_LABELS} organs)", mean, "", **params))
            for rank in range(3):
                values = [float(s[rank]) for s in scores[arm_name]]
                mean, sd = _summary(values)
                figures.append(
                    figure(
                        f"fewshot CT K={k} {arm_name}: Dice of organ {rank + 1} (class {class_ids[rank]})",
                        mean,
                        "",
                        k=k,
                        arm=arm_name,
                        class_id=class_ids[rank],
                        sd=sd,
                        per_seed=values,
                    )
                )
        for arm_name, diffs in paired_differences(seed_means).items():
            mean, sd = _summary(diffs)
            figures.append(
                figure(
                    f"fewshot CT K={k} {arm_name} minus monai: paired mean Dice difference",
                    mean,
                    "",
                    k=k,
                    arm=arm_name,
                    reference_arm="monai",
                    sd=sd,
                    per_seed=diffs,
                    note="per seed: the arm's mean Dice minus the monai arm's on the same split and initialisation",
                )
            )
    for arm_name in ARMS[1:]:
        figures.append(
            figure(
                f"fewshot CT {arm_name}: augmentation seconds per sample",
                statistics.fmean(aug_time[arm_name]),
                "s",
                arm=arm_name,
                note="DRDM arms: bank generation amortised over the run's draws",
                **common,
            )
        )
    probe = int(np.argmax(labels.flatten(1).gt(0).sum(1)))  # the slice with the most labelled pixels
    for level, (start_pct, recovered_pct) in recovery_effect(sampler, images[probe], settings["t_prime"], 4).items():
        for label, value in (("random start field", start_pct), ("recovered field", recovered_pct)):
            figures.append(
                figure(
                    f"fewshot CT DRDM T'={level}: mean displacement of the {label}",
                    value,
                    "% of slice size",
                    level=level,
                    slice=probe,
                    draws=4,
                    **common,
                )
            )
    for level, stats in sorted(bank.items()):
        for key, label, unit in (
            ("mean_displacement_pct", "mean displacement", "% of slice size"),
            ("p99_displacement_pct", "p99 displacement", "% of slice size"),
            ("folding_fraction", "folding (det J <= 0)", "fraction"),
        ):
            figures.append(
                figure(
                    f"fewshot CT DRDM bank fields T'={level}: {label}",
                    statistics.fmean(s[key] for s in stats),
                    unit,
                    level=level,
                    fields=len(stats),
                    **common,
                )
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

"""2D registration trained on DRDM registration pairs vs random smooth fields of matched magnitude (issue 19 part 2).

Training pairs, both from the axial slices of the shared CT (the preprocessing of :mod:`benchmarks.drdm_fewshot`:
HU window [-250, 350] to [0, 1], padded to 128x112; quick: every second pixel, 64x64):

- ``drdm``: Algorithm 4 through :class:`drdm.workflows.RegistrationPairWorkflow` (slices written as NIfTI, pairs
  read back from its ``_moving``/``_fixed``/``_ddf``/``_aug_ddf`` files; ``fixed_from="source"``), level pairs
  (T'_aug, T'_syn) = (8, 8) and (16, 8), 2 triplets each per source slice, every slice a source; the DRDM model of
  :func:`benchmarks.drdm_model.load_or_train_drdm` (``$DRDM_REGISTRATION_MODEL``, else
  ``$DRDM_FEWSHOT_MODEL``, else trained inside the benchmark), sampler ``recovery_stride`` 2.
- ``random``: for each DRDM triplet, the same source slice with two random smooth fields
  (:func:`random_smooth_field`: Gaussian noise on a control grid every 16 px, bicubic upsampling) scaled so their
  mean displacement equals that triplet's ``φ_aug`` and ``φ_syn`` (moving = warp(source, r_aug), fixed =
  warp(source, r_aug ⊕ r_syn), target r_syn): the same structure and magnitude, no learned anatomy.

Network: a small MONAI ``UNet`` (2 input channels moving/fixed, channels 16/32/32/32) with a zero-initialised 3x3
convolution head predicting the DDF (voxels, MONAI ``Warp`` convention); loss = MSE(``Warp``(moving, ddf), fixed)
+ 1.0 ``BendingEnergyLoss`` + 0.01 MSE(ddf, target field), Adam 1e-3, the same iterations (batches of 4 pairs
drawn with replacement) for both arms and every seed.

Evaluation on real pairs with labels: moving = slice z + o, fixed = slice z, for every z and o = 2 and 4 slices
(6 and 12 mm apart; quick: 2); label Dice after warping the moving labels (nearest) with the predicted field
(MONAI ``DiceMetric``, the 8 organs of :mod:`benchmarks.drdm_fewshot`, labels absent from a pair ignored), the
identity (no registration) Dice, and the fraction of non-positive Jacobian determinants of the predicted field.
Mean ± sd over 3 seeds (``sd``, ``per_seed`` in ``params``).

Run: ``python -m benchmarks run --only drdm_registration [--quick]`` (full: 400 DRDM iterations, 120 triplets,
2 arms x 3 seeds x 600 iterations, about 7 min on one thread, estimated from per-step costs: 0.3 s per DRDM
iteration, 0.7 s per triplet, 0.05 s per registration iteration; quick: a plumbing check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss
from monai.metrics import DiceMetric
from monai.networks.blocks import Warp
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from torch import nn

from benchmarks.drdm_fewshot import N_LABELS, ct_slices
from benchmarks.drdm_model import drdm_config, load_or_train_drdm
from benchmarks.timing import figure
from data_prep.shared import shared_data_dir
from drdm.fields import compose, folding_fraction
from drdm.io import read_ddf, read_volume
from drdm.networks import RecoveryNet
from drdm.sampler import warp_intensities, warp_labels
from drdm.workflows import RegistrationPairWorkflow

__all__ = [
    "FULL",
    "NAME",
    "QUICK",
    "drdm_pairs",
    "evaluate_registration",
    "random_pairs",
    "random_smooth_field",
    "real_pairs",
    "registration_net",
    "run",
    "train_registration",
]

NAME = "drdm_registration"

QUICK: dict[str, Any] = {
    "subsample": 2,
    "pad": [64, 64],
    "seeds": [0, 1],
    "steps": 4,
    "batch": 2,
    "channels": [8, 16, 16],
    "drdm_iterations": 3,
    "drdm_roi": [32, 32],
    "drdm_batch": 2,
    "level_pairs": [[4, 4]],
    "outputs_per_pair": 1,
    "source_every": 15,
    "offsets": [2],
    "recovery_stride": 2,
    "control_spacing": 8,
}
FULL: dict[str, Any] = {
    "subsample": 1,
    "pad": [128, 112],
    "seeds": [0, 1, 2],
    "steps": 600,
    "batch": 4,
    "channels": [16, 32, 32, 32],
    "drdm_iterations": 400,
    "drdm_roi": [64, 64],
    "drdm_batch": 4,
    "level_pairs": [[8, 8], [16, 8]],
    "outputs_per_pair": 2,
    "source_every": 1,
    "offsets": [2, 4],
    "recovery_stride": 2,
    "control_spacing": 16,
}
LOSS_WEIGHTS = {"similarity_mse": 1.0, "bending": 1.0, "ddf_mse": 0.01}

Pair = dict[str, torch.Tensor]


def _log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def random_smooth_field(
    shape: tuple[int, ...] | list[int],
    mean_displacement: float,
    control_spacing: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random smooth field ``[1, d, *shape]`` (voxels) whose mean displacement magnitude is ``mean_displacement``.

    Standard normal vectors on a control grid every ``control_spacing`` voxels (plus one), upsampled bicubically
    (2D) or trilinearly (3D, corners aligned), then scaled so the mean of ``|u|`` over the grid is exactly
    ``mean_displacement``.

    Args:
        shape: spatial shape (2 or 3 dims).
        mean_displacement: requested mean ``|u|`` in voxels (>= 0).
        control_spacing: voxels between control points (>= 1).
        generator: random generator.

    Returns:
        The float32 field.

    Raises:
        ValueError: a bad shape, a negative or non-finite magnitude, or a spacing < 1.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"random_smooth_field: shape must have 2 or 3 positive sizes, got {shape}.")
    if not math.isfinite(mean_displacement) or mean_displacement < 0:
        raise ValueError(f"random_smooth_field: mean_displacement must be finite and >= 0, got {mean_displacement}.")
    if int(control_spacing) != control_spacing or control_spacing < 1:
        raise ValueError(f"random_smooth_field: control_spacing must be an integer >= 1, got {control_spacing!r}.")
    d = len(shape)
    coarse_shape = [max(2, math.ceil(s / control_spacing) + 1) for s in shape]
    coarse = torch.randn(1, d, *coarse_shape, generator=generator)
    mode = "bicubic" if d == 2 else "trilinear"
    field = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    mean = float(field.norm(dim=1).mean())
    return (field * (mean_displacement / mean if mean > 0 else 0.0)).float()


def _write_slices(images: torch.Tensor, indices: list[int], folder: Path) -> list[dict[str, str]]:
    """Write slices ``[1, H, W]`` as ``(H, W, 1)`` NIfTI files (1 mm, identity affine); returns a datalist."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for z in indices:
        path = folder / f"z{z:02d}.nii.gz"
        nib.save(nib.Nifti1Image(images[z, 0].numpy()[..., None].astype(np.float32), np.eye(4)), str(path))
        items.append({"id": f"z{z:02d}", "image": str(path)})
    return items


def drdm_pairs(
    network: RecoveryNet,
    diffusion: Any,
    images: torch.Tensor,
    sources: list[int],
    settings: dict[str, Any],
    folder: Path,
    seed: int = 0,
) -> tuple[list[Pair], dict[str, Any]]:
    """DRDM registration triplets of the source slices via :class:`RegistrationPairWorkflow`, read back from disk.

    Returns:
        Pairs (``source``, ``moving``, ``fixed``, ``ddf``, ``aug_ddf``; ``[1, *S]`` / ``[2, *S]``) and a summary of
        the fields (mean displacement in voxels, folding) and the generation time.
    """
    datalist = _write_slices(images, sources, folder / "slices")
    sampler_kw = {**drdm_config()[2], "batch_size": 8, "recovery_stride": settings["recovery_stride"]}
    out = folder / "pairs"
    workflow = RegistrationPairWorkflow(
        datalist,
        network,
        diffusion,
        out,
        level_pairs=[tuple(p) for p in settings["level_pairs"]],
        outputs_per_pair=settings["outputs_per_pair"],
        sampler_kwargs=sampler_kw,
        seed=seed,
    )
    start = time.perf_counter()
    reports = workflow.run()
    seconds = time.perf_counter() - start
    by_id = {item["id"]: int(item["id"][1:]) for item in datalist}
    pairs = []
    for rep in reports:
        files = {k: out / v for k, v in rep["files"].items()}
        pairs.append(
            {
                "source": images[by_id[rep["id"]]],
                "moving": read_volume(files["moving"], 2).as_tensor().float(),
                "fixed": read_volume(files["fixed"], 2).as_tensor().float(),
                "ddf": read_ddf(files["ddf"], 2),
                "aug_ddf": read_ddf(files["aug_ddf"], 2),
            }
        )
    info = {
        "pairs": len(pairs),
        "pair_seconds": round(seconds, 2),
        "syn_mean_vox": statistics.fmean(r["mean_displacement_vox"] for r in reports),
        "aug_mean_vox": statistics.fmean(r["moving_field"]["mean_displacement_vox"] for r in reports),
        "syn_folding_pct": 100 * statistics.fmean(r["folding_fraction"] for r in reports),
    }
    return pairs, info


def random_pairs(pairs: list[Pair], control_spacing: int, seed: int = 0) -> list[Pair]:
    """Pairs of the same sources from random smooth fields matched to each DRDM pair's mean displacement."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for pair in pairs:
        shape = tuple(pair["source"].shape[1:])
        aug = random_smooth_field(shape, float(pair["aug_ddf"].norm(dim=0).mean()), control_spacing, generator)
        syn = random_smooth_field(shape, float(pair["ddf"].norm(dim=0).mean()), control_spacing, generator)
        src = pair["source"][None].float()
        moving = warp_intensities(src, aug)[0]
        fixed = warp_intensities(src, compose(aug, syn))[0]
        out.append({"source": pair["source"], "moving": moving, "fixed": fixed, "ddf": syn[0], "aug_ddf": aug[0]})
    return out


def real_pairs(images: torch.Tensor, labels: torch.Tensor, offset: int) -> list[Pair]:
    """Real pairs ``moving = slice z + offset``, ``fixed = slice z`` with their labels, for every valid ``z``."""
    return [
        {"moving": images[z + offset], "fixed": images[z], "moving_label": labels[z + offset], "fixed_label": labels[z]}
        for z in range(len(images) - offset)
    ]


def registration_net(channels: list[int]) -> nn.Module:
    """A small 2D MONAI ``UNet`` (moving, fixed -> 8 features) and a zero-initialised 3x3 convolution to a DDF."""
    unet = UNet(2, 2, 8, tuple(channels), (2,) * (len(channels) - 1), num_res_units=1)
    head = nn.Conv2d(8, 2, 3, padding=1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(unet, head)


def train_registration(pairs: list[Pair], settings: dict[str, Any], seed: int) -> nn.Module:
    """Train :func:`registration_net` for ``settings["steps"]`` iterations on ``pairs`` (seeded init and draws)."""
    torch.manual_seed(seed)
    net = registration_net(settings["channels"])
    warper = Warp("bilinear", "border")
    bending = BendingEnergyLoss()
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    draws = torch.Generator().manual_seed(seed)
    w = LOSS_WEIGHTS
    net.train()
    for _ in range(int(settings["steps"])):
        picks = torch.randint(0, len(pairs), (int(settings["batch"]),), generator=draws).tolist()
        moving = torch.stack([pairs[p]["moving"] for p in picks])
        fixed = torch.stack([pairs[p]["fixed"] for p in picks])
        target = torch.stack([pairs[p]["ddf"] for p in picks])
        ddf = net(torch.cat([moving, fixed], 1))
        loss = (
            w["similarity_mse"] * F.mse_loss(warper(moving, ddf), fixed)
            + w["bending"] * bending(ddf)
            + w["ddf_mse"] * F.mse_loss(ddf, target)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def evaluate_registration(net: nn.Module | None, pairs: list[Pair], n_labels: int = N_LABELS) -> tuple[float, float]:
    """Mean label Dice after warping the moving labels (``None``: identity) and mean folding fraction (%).

    Dice: MONAI ``DiceMetric`` per pair and label (background excluded, labels absent from a pair ignored),
    averaged over the labels and pairs it is defined for.
    """
    moving = torch.stack([p["moving"] for p in pairs])
    fixed = torch.stack([p["fixed"] for p in pairs])
    mov_lab = torch.stack([p["moving_label"] for p in pairs])
    fix_lab = torch.stack([p["fixed_label"] for p in pairs])
    if net is None:
        ddf = torch.zeros(moving.shape[0], 2, *moving.shape[2:])
    else:
        ddf = net(torch.cat([moving, fixed], 1))
    warped = warp_labels(mov_lab, ddf, "nearest", "border")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    scores = metric(one_hot(warped.long(), n_labels + 1), one_hot(fix_lab.long(), n_labels + 1)).numpy()
    dice = float(np.nanmean(scores)) if not np.isnan(scores).all() else float("nan")
    return dice, 100 * float(folding_fraction(ddf).mean())


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(quick: bool = False) -> list[dict]:
    """Label Dice and folding on real CT slice pairs, per training-pair source (one note figure without the CT).

    Args:
        quick: 64² slices, 2 source slices, 2 seeds, a few iterations.

    Returns:
        Figure records.
    """
    root = shared_data_dir()
    if root is None or not (root / "ct" / "ct.nii.gz").is_file() or not (root / "ct" / "seg.nii.gz").is_file():
        return [figure("drdm_registration: shared CT absent, nothing measured", 0.0, "")]
    settings = QUICK if quick else FULL
    images, labels, class_ids = ct_slices(root, settings)
    env = "DRDM_REGISTRATION_MODEL" if os.environ.get("DRDM_REGISTRATION_MODEL") else "DRDM_FEWSHOT_MODEL"
    network, diffusion, drdm_info = load_or_train_drdm(images, settings, env)
    _log(f"DRDM model: {drdm_info}")
    sources = list(range(0, len(images), int(settings["source_every"])))
    with tempfile.TemporaryDirectory() as tmp:
        train_sets = {"drdm": drdm_pairs(network, diffusion, images, sources, settings, Path(tmp))}
    pairs, pair_info = train_sets["drdm"]
    rand = random_pairs(pairs, settings["control_spacing"])
    rand_info = {
        "syn_mean_vox": statistics.fmean(float(p["ddf"].norm(dim=0).mean()) for p in rand),
        "aug_mean_vox": statistics.fmean(float(p["aug_ddf"].norm(dim=0).mean()) for p in rand),
        "syn_folding_pct": 100 * float(folding_fraction(torch.stack([p["ddf"] for p in rand])).mean()),
    }
    _log(f"DRDM pairs: {pair_info}; random pairs: {rand_info}")
    common = {k: settings[k] for k in ("steps", "batch", "channels", "pad", "subsample", "level_pairs")}
    common.update({"recovery_stride": settings["recovery_stride"], "outputs_per_pair": settings["outputs_per_pair"]})
    common.update({"sources": sources, "loss_weights": LOSS_WEIGHTS, "class_ids": class_ids, **drdm_info})
    common["threads"] = torch.get_num_threads()
    figures = [
        figure(
            f"registration CT training pairs {name}: mean displacement of the target field",
            info["syn_mean_vox"],
            "voxels",
            arm=name,
            **{k: v for k, v in info.items() if k != "syn_mean_vox"},
            control_spacing=settings["control_spacing"] if name == "random" else None,
        )
        for name, info in (("drdm", pair_info), ("random", rand_info))
    ]
    tests = {o: real_pairs(images, labels, o) for o in settings["offsets"]}
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for arm, train in (("drdm", pairs), ("random", rand)):
        for seed in settings["seeds"]:
            start = time.perf_counter()
            net = train_registration(train, settings, seed)
            seconds = time.perf_counter() - start
            for o, test in tests.items():
                results.setdefault((arm, o), []).append(evaluate_registration(net, test))
            _log(f"{arm} seed={seed}: {seconds:.1f} s, {[results[(arm, o)][-1] for o in tests]}")
    for o, test in tests.items():
        mm = 3 * o
        identity, _ = evaluate_registration(None, test)
        figures.append(
            figure(f"registration CT slices {o} apart ({mm} mm): label Dice without registration", identity, "")
        )
        for arm in ("drdm", "random"):
            dice, dsd = _mean_sd([r[0] for r in results[(arm, o)]])
            fold, fsd = _mean_sd([r[1] for r in results[(arm, o)]])
            params = {"arm": arm, "offset_slices": o, "test_pairs": len(test), "seeds": settings["seeds"], **common}
            figures.append(
                figure(
                    f"registration CT slices {o} apart ({mm} mm), trained on {arm} pairs: label Dice after warping",
                    dice,
                    "",
                    sd=dsd,
                    per_seed=[r[0] for r in results[(arm, o)]],
                    **params,
                )
            )
            figures.append(
                figure(
                    f"registration CT slices {o} apart ({mm} mm), trained on {arm} pairs: folding (det J <= 0)",
                    fold,
                    "%",
                    sd=fsd,
                    per_seed=[r[1] for r in results[(arm, o)]],
                    arm=arm,
                    offset_slices=o,
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

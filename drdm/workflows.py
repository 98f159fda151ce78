"""File-level DRDM jobs used by the bundle configs: dataset augmentation (Algorithm 3) and registration-pair
synthesis (Algorithm 4).

Each output is written as NIfTI on the **input's geometry** (affine, spacing, orientation), together with its
displacement field (``*_ddf.nii.gz``, voxels, MONAI ``Warp`` convention) and a JSON report (T', mean and
99th-percentile displacement in mm and % of the image size, folding fraction, guard outcome). All inputs and
settings (``precision`` included) are checked before any sampling starts. All outputs of one input are generated
as one batch by :class:`~drdm.sampler.DRDMSampler` (``batch_size`` rows at a time, in ``sampler_kwargs``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRangePercentiles
from monai.utils import convert_to_tensor
from torch import nn

from ddcore.atomic import atomic_write_json
from ddcore.checkpoints import load_checked_state_dict
from ddcore.content import check_integer_labels
from ddcore.datalist import load_volume_datalist
from ddcore.precision import check_precision
from drdm.diffusion import DeformationDiffusion
from drdm.io import deformation_stats, file_dtype, read_volume, save_ddf, save_volume, spacing
from drdm.sampler import DRDMSampler, SampleResult, warp_intensities, warp_labels

__all__ = ["AugmentationWorkflow", "RegistrationPairWorkflow", "load_items"]

logger = logging.getLogger(__name__)


def load_items(datalist: str | os.PathLike | Sequence[dict], split: str = "training") -> list[dict]:
    """Items with absolute ``image`` (and optional ``label``) paths from a datalist file or a list of dicts.

    Args:
        datalist: MONAI-style datalist JSON (paths relative to its folder) or a list of items.
        split: list key inside the datalist file.

    Returns:
        Items (copies) with absolute paths and an ``id``.

    Raises:
        ValueError / FileNotFoundError: see :func:`ddcore.datalist.load_volume_datalist`.
    """
    if isinstance(datalist, (str, os.PathLike)):
        return load_volume_datalist(datalist, split)
    items = []
    for i, item in enumerate(datalist):
        if "image" not in item:
            raise ValueError(f"datalist item {i} has no 'image' key: {item}")
        new = dict(item)
        new.setdefault("id", Path(str(item["image"])).name.split(".")[0])
        items.append(new)
    return items


class _Job:
    """Shared set-up: network, sampler, inputs, normalisation, writers."""

    def __init__(
        self,
        datalist: str | os.PathLike | Sequence[dict],
        network: nn.Module,
        diffusion: DeformationDiffusion,
        output_dir: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        split: str = "training",
        sampler_kwargs: dict | None = None,
        lower_percentile: float = 0.5,
        upper_percentile: float = 99.5,
        seed: int = 0,
        device: str | torch.device = "cpu",
        save_random: bool = False,
        precision: str = "fp32",
    ) -> None:
        self.device = torch.device(device)
        self.precision = check_precision(precision, self.device)
        kwargs = dict(sampler_kwargs or {})
        if "precision" in kwargs and check_precision(kwargs["precision"], self.device) != self.precision:
            raise ValueError(
                f"precision={precision!r} but sampler_kwargs['precision']={kwargs['precision']!r}; set one of them."
            )
        kwargs["precision"] = self.precision
        self.items = load_items(datalist, split)
        if not self.items:
            raise ValueError(f"datalist {datalist!s} has no items under {split!r}.")
        self.network = network
        self.checkpoint = checkpoint
        self.diffusion = diffusion
        self.sampler = DRDMSampler(network, diffusion, device=self.device, **kwargs)
        self.output_dir = Path(output_dir)
        self.normalise = ScaleIntensityRangePercentiles(lower_percentile, upper_percentile, 0.0, 1.0, clip=True)
        self.seed = int(seed)
        self.save_random = save_random
        self.spatial_dims = int(getattr(network, "spatial_dims", 3))

    def _validate(self) -> None:
        """Read every input once and check labels before any sampling (clear early errors)."""
        for item in self.items:
            img = read_volume(item["image"], self.spatial_dims, f"item {item['id']} image")
            if item.get("label"):
                lab = read_volume(item["label"], self.spatial_dims, f"item {item['id']} label")
                if lab.shape != img.shape:
                    raise ValueError(
                        f"item {item['id']}: label {item['label']} has shape {tuple(lab.shape[1:])}, "
                        f"image {item['image']} has {tuple(img.shape[1:])}; they must share the grid."
                    )
                check_integer_labels(lab, f"item {item['id']} label", str(item["label"]))

    def _prepare(self) -> None:
        if self.checkpoint:
            load_checked_state_dict(self.network, self.checkpoint, "DRDM recovery network", key="model")
        self.network.to(self.device).eval()
        self._validate()

    def _load(
        self, item: dict
    ) -> tuple[MetaTensor, torch.Tensor, torch.Tensor, MetaTensor | None, torch.Tensor | None]:
        """The image volume, its intensities ``[1, 1, *S]``, the network input, the label volume and labels."""
        vol = read_volume(item["image"], self.spatial_dims, "image")
        raw = vol.as_tensor()[None].to(self.device)
        net_in = convert_to_tensor(self.normalise(raw[0]), dtype=torch.float32, track_meta=False)[None]
        lab_vol, labels = None, None
        if item.get("label"):
            lab_vol = read_volume(item["label"], self.spatial_dims, "label")
            labels = lab_vol.as_tensor().long()[None].to(self.device)
        return vol, raw, net_in, lab_vol, labels

    def _warp_original(self, raw: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """Warp the original intensities; outside the image takes the image minimum (background)."""
        return warp_intensities(raw, ddf, self.sampler.image_mode)

    def _report(self, result: SampleResult, vol: MetaTensor, extra: dict[str, Any], row: int = 0) -> dict[str, Any]:
        stats = deformation_stats(result.ddf[row], spacing(vol))
        return {
            **extra,
            "t_prime": result.t_prime,
            "start": self.sampler.start,
            "recovery_steps": len(self.sampler.recovery_levels(result.t_prime)),
            **stats,
            "random_field_mean_displacement_vox": float(result.random_ddf[row].norm(dim=0).mean()),
            "folding_threshold": self.sampler.folding_threshold,
            "accepted": bool(result.accepted[row]),
            "attempts": int(result.attempts[row]),
            "precision": self.sampler.precision,
            "spacing_mm": list(spacing(vol)),
            "ddf_units": "voxels; component i = displacement along array axis i; out(x) = in(x + ddf(x))",
        }


class AugmentationWorkflow(_Job):
    """Algorithm 3: ``outputs_per_level`` deformed copies of every (image, label) item for each ``T'``.

    Writes ``<id>_tp<T'>_<k>_image.nii.gz``, ``_label.nii.gz`` (when the item has a label), ``_ddf.nii.gz`` and
    ``.json`` into ``output_dir``, plus ``outputs.json`` (all reports) and ``augmented_datalist.json`` (a MONAI
    datalist of the outputs, ready for segmentation training).

    Args:
        datalist: datalist JSON or list of items with ``image`` and optional ``label``.
        network: recovery network.
        diffusion: forward process (as trained).
        output_dir: output folder.
        t_primes: start levels (each in ``[1, T]``).
        outputs_per_level: outputs per level and item.
        checkpoint: network weights to load first (``None``: use the network as is).
        split: datalist key.
        sampler_kwargs: :class:`~drdm.sampler.DRDMSampler` options (start, folding_threshold, label_mode, ...).
        lower_percentile: intensity normalisation of the network input (as in training).
        upper_percentile: idem.
        seed: random seed of the draws.
        device: torch device.
        save_random: also save the random (unrecovered) field and image, for inspection.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only) for the network's forward passes.
    """

    def __init__(
        self,
        datalist: str | os.PathLike | Sequence[dict],
        network: nn.Module,
        diffusion: DeformationDiffusion,
        output_dir: str | os.PathLike,
        t_primes: Sequence[int] = (16, 24, 32),
        outputs_per_level: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(datalist, network, diffusion, output_dir, **kwargs)
        self.t_primes = [self.sampler.check_t_prime(t) for t in t_primes]
        if outputs_per_level < 1:
            raise ValueError(f"outputs_per_level must be >= 1, got {outputs_per_level}.")
        self.outputs_per_level = int(outputs_per_level)

    def run(self) -> list[dict[str, Any]]:
        """Generate and write every output; returns the reports."""
        self._prepare()
        generator = torch.Generator().manual_seed(self.seed)
        reports: list[dict[str, Any]] = []
        datalist: list[dict[str, str]] = []
        for item in self.items:
            vol, raw, net_in, lab_vol, labels = self._load(item)
            start = time.perf_counter()
            results = self.sampler.augment(net_in, self.t_primes, self.outputs_per_level, labels, generator)
            seconds = (time.perf_counter() - start) / len(results)
            for j, res in enumerate(results):
                t_prime, k = res.t_prime, j % self.outputs_per_level
                stem = f"{item['id']}_tp{t_prime:03d}_{k:02d}"
                files = {"image": f"{stem}_image.nii.gz", "ddf": f"{stem}_ddf.nii.gz"}
                save_volume(self._warp_original(raw, res.ddf)[0, 0], vol, self.output_dir / files["image"], np.float32)
                save_ddf(res.ddf[0], vol, self.output_dir / files["ddf"])
                if res.labels is not None and lab_vol is not None:
                    files["label"] = f"{stem}_label.nii.gz"
                    save_volume(res.labels[0, 0], lab_vol, self.output_dir / files["label"], file_dtype(lab_vol))
                if self.save_random:
                    files["random_image"] = f"{stem}_random_image.nii.gz"
                    save_volume(
                        self._warp_original(raw, res.random_ddf)[0, 0],
                        vol,
                        self.output_dir / files["random_image"],
                        np.float32,
                    )
                extra = {"id": item["id"], "source_image": str(item["image"]), "index": k, "files": files}
                report = self._report(res, vol, extra)
                report["seconds"] = seconds  # batch time / outputs of this input
                atomic_write_json(report, self.output_dir / f"{stem}.json")
                reports.append(report)
                datalist.append({"id": stem, **{k2: v for k2, v in files.items() if k2 in ("image", "label")}})
                logger.info(
                    "DRDM augment %s: %.2f %% mean displacement, folding %.3f %%",
                    stem,
                    report["mean_displacement_pct"],
                    100 * report["folding_fraction"],
                )
        atomic_write_json(reports, self.output_dir / "outputs.json")
        atomic_write_json(
            {"name": "drdm_augmented", "modalities": ["image"], "training": datalist},
            self.output_dir / "augmented_datalist.json",
        )
        return reports


def _difference_pct(a: torch.Tensor, b: torch.Tensor, scale: float) -> dict[str, float]:
    """Mean and max ``|a - b|`` in % of an intensity range."""
    diff = (a - b).abs() / max(scale, 1e-12) * 100.0
    return {"mean_pct": float(diff.mean()), "max_pct": float(diff.max())}


class RegistrationPairWorkflow(_Job):
    """Algorithm 4: (moving, fixed, ground-truth DDF) triplets for every item and ``(T'_aug, T'_syn)`` pair.

    Writes, per triplet ``<id>_pair<j>_<k>``: ``_moving.nii.gz``, ``_fixed.nii.gz``, ``_ddf.nii.gz`` (``φ_syn``,
    the registration target: ``fixed ≈ warp(moving, ddf)``), ``_aug_ddf.nii.gz`` (``φ_aug``:
    ``moving = warp(source, aug_ddf)``), ``_composed_ddf.nii.gz`` (``φ_aug ⊕ φ_syn``:
    ``fixed ≈ warp(source, composed_ddf)``), label maps when present, and a JSON report, plus ``outputs.json`` and
    ``pairs_datalist.json``. Every field is a NIfTI vector image on the source's grid and affine (see
    :func:`drdm.io.save_ddf`: voxels, component ``i`` along array axis ``i``, MONAI ``Warp`` pull-back); a warp
    here is :func:`drdm.sampler.warp_intensities` (bilinear; what comes from outside takes the image minimum).

    Both images cannot be single interpolations of the source *and* exactly related by ``φ_syn``:
    ``warp(moving, φ_syn)`` resamples an already resampled image (and ``composed`` is itself a resampled
    composition), so one of the two identities holds only up to bilinear interpolation error. ``fixed_from``
    chooses which one is exact (up to float32 rounding), and each report measures the other
    (``fixed_vs_warped_moving`` / ``fixed_vs_warped_source``: mean and max ``|difference|`` in % of the source's
    intensity range):

    - ``"source"`` (default, Algorithm 4 as in :meth:`DRDMSampler.registration_pair`): moving and fixed are both
      warped once from the source, with ``aug_ddf`` and ``composed_ddf``; ``fixed = warp(source, composed_ddf)``
      exactly, fixed labels likewise (nearest), and ``fixed ≈ warp(moving, ddf)`` is off by the extra
      interpolation (largest at edges and where ``moving`` took background from outside the grid).
    - ``"moving"``: ``fixed = warp(moving, ddf)`` exactly (a fully consistent registration target; fixed labels
      are the moving labels warped nearest by ``ddf``), and ``fixed ≈ warp(source, composed_ddf)`` is off by the
      interpolation error instead (fixed is slightly blurrier).

    Args:
        datalist: datalist JSON or list of items.
        network: recovery network.
        diffusion: forward process.
        output_dir: output folder.
        level_pairs: ``[(t_aug, t_syn), ...]`` start levels.
        outputs_per_pair: triplets per pair and item.
        fixed_from: ``"source"`` or ``"moving"`` (see above).
        **kwargs: as :class:`AugmentationWorkflow`.
    """

    def __init__(
        self,
        datalist: str | os.PathLike | Sequence[dict],
        network: nn.Module,
        diffusion: DeformationDiffusion,
        output_dir: str | os.PathLike,
        level_pairs: Sequence[Sequence[int]] = ((16, 16), (24, 16)),
        outputs_per_pair: int = 1,
        fixed_from: str = "source",
        **kwargs: Any,
    ) -> None:
        if fixed_from not in ("source", "moving"):
            raise ValueError(f"fixed_from must be 'source' or 'moving', got {fixed_from!r}.")
        self.fixed_from = fixed_from
        super().__init__(datalist, network, diffusion, output_dir, **kwargs)
        pairs = []
        for pair in level_pairs:
            if len(pair) != 2:
                raise ValueError(f"level_pairs entries must be (t_aug, t_syn), got {pair!r}.")
            pairs.append((self.sampler.check_t_prime(pair[0]), self.sampler.check_t_prime(pair[1])))
        self.level_pairs = pairs
        if outputs_per_pair < 1:
            raise ValueError(f"outputs_per_pair must be >= 1, got {outputs_per_pair}.")
        self.outputs_per_pair = int(outputs_per_pair)

    def _pair_images(
        self, raw: torch.Tensor, fields: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict[str, float]]]:
        """Moving and fixed from the source by ``fixed_from``, and both consistency residuals (in % of the range)."""
        moving = self._warp_original(raw, fields["aug_ddf"])
        from_source = self._warp_original(raw, fields["composed_ddf"])
        from_moving = self._warp_original(moving, fields["ddf"])
        fixed = from_source if self.fixed_from == "source" else from_moving
        scale = float(raw.max() - raw.min())
        checks = {
            "fixed_vs_warped_moving": _difference_pct(fixed, from_moving, scale),
            "fixed_vs_warped_source": _difference_pct(fixed, from_source, scale),
        }
        return moving, fixed, checks

    def run(self) -> list[dict[str, Any]]:
        """Generate and write every triplet; returns the reports."""
        self._prepare()
        generator = torch.Generator().manual_seed(self.seed)
        reports: list[dict[str, Any]] = []
        datalist: list[dict[str, str]] = []
        for item in self.items:
            vol, raw, net_in, lab_vol, labels = self._load(item)
            for j, (t_aug, t_syn) in enumerate(self.level_pairs):
                copies = self.outputs_per_pair  # all triplets of a pair as one batch of rows
                batch_in = net_in.expand(copies, *net_in.shape[1:])
                batch_labels = None if labels is None else labels.expand(copies, *labels.shape[1:])
                trip = self.sampler.registration_pair(batch_in, t_aug, t_syn, batch_labels, generator)
                for k in range(copies):
                    stem = f"{item['id']}_pair{j:02d}_{k:02d}"
                    files = {
                        name: f"{stem}_{name}.nii.gz" for name in ("moving", "fixed", "ddf", "aug_ddf", "composed_ddf")
                    }
                    fields = {
                        "ddf": trip.ddf[k : k + 1],
                        "aug_ddf": trip.moving_result.ddf[k : k + 1],
                        "composed_ddf": trip.source_to_fixed[k : k + 1],
                    }
                    moving, fixed, checks = self._pair_images(raw, fields)
                    save_volume(moving[0, 0], vol, self.output_dir / files["moving"], np.float32)
                    save_volume(fixed[0, 0], vol, self.output_dir / files["fixed"], np.float32)
                    for name, field in fields.items():
                        save_ddf(field[0], vol, self.output_dir / files[name])
                    if lab_vol is not None and trip.moving_labels is not None and trip.fixed_labels is not None:
                        files["moving_label"] = f"{stem}_moving_label.nii.gz"
                        files["fixed_label"] = f"{stem}_fixed_label.nii.gz"
                        fixed_labels = trip.fixed_labels[k : k + 1]
                        if self.fixed_from == "moving":
                            fixed_labels = warp_labels(
                                trip.moving_labels[k : k + 1],
                                fields["ddf"],
                                self.sampler.label_mode,
                                self.sampler.label_padding_mode,
                            )
                        dt = file_dtype(lab_vol)
                        save_volume(trip.moving_labels[k, 0], lab_vol, self.output_dir / files["moving_label"], dt)
                        save_volume(fixed_labels[0, 0], lab_vol, self.output_dir / files["fixed_label"], dt)
                    report = self._report(trip.fixed_result, vol, {"id": item["id"], "files": files}, row=k)
                    report.update({"t_aug": t_aug, "t_syn": t_syn, "index": k, "field": "ddf maps moving onto fixed"})
                    report.update({"fixed_from": self.fixed_from, "source_image": str(item["image"]), **checks})
                    report["moving_field"] = deformation_stats(fields["aug_ddf"][0], spacing(vol))
                    report["composed_field"] = deformation_stats(fields["composed_ddf"][0], spacing(vol))
                    atomic_write_json(report, self.output_dir / f"{stem}.json")
                    reports.append(report)
                    datalist.append({"id": stem, **files})
        atomic_write_json(reports, self.output_dir / "outputs.json")
        atomic_write_json(
            {"name": "drdm_registration_pairs", "modalities": ["moving", "fixed", "ddf"], "training": datalist},
            self.output_dir / "pairs_datalist.json",
        )
        return reports

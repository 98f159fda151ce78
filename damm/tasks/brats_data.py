"""BraTS task data: subjects (folder or datalist), checks, the subject or slice split, training slices, evaluation
cases: the data side of the :class:`~damm.tasks.protocol.RealDataTask` for BraTS (see :mod:`damm.tasks.brats`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from damm.tasks.brats_files import LABEL_KEY, MODALITIES, check_subject_files, find_subjects
from damm.tasks.brats_subject import (
    PreparedSubject,
    prepare_subject,
    subject_pipeline,
    synthesise_subject,
    voxels,
    write_nifti_like,
)
from damm.tasks.brats_volume import heldout_mask_input_grid, heldout_slab, pad_to, round_up, slab_labels, slice_s_coords
from damm.tasks.common import write_intensity_reference
from damm.tasks.metrics import to_unit
from damm.tasks.protocol import EvaluationCase, RealDataTask
from ddcore.atomic import atomic_write_json
from ddcore.content import check_integer_labels, check_real_file
from transforms.checks import affine_of
from transforms.intensity import NORM_META_KEY
from transforms.slices import foreground_fractions, take_slice

__all__ = ["BraTSTaskData", "preprocessing_record_path"]

logger = logging.getLogger(__name__)


def preprocessing_record_path(reference_path: str | Path) -> Path:
    """Where the preprocessing record lies: beside the intensity reference (``models/task_preprocessing.json``).

    Args:
        reference_path: the task's ``reference_path`` (``models/target_intensity.json``).

    Returns:
        The record's path.
    """
    return Path(reference_path).with_name("task_preprocessing.json")


class BraTSTaskData(RealDataTask):
    """Training slices and evaluation subjects of a BraTS-style dataset, with the configured split.

    Work is lazy (nothing is read until :meth:`items` / :meth:`evaluation_subjects` / :meth:`check`).

    Args:
        dataset_dir: folder of subjects (any naming scheme), used when ``datalist`` is ``None``.
        target: target modality.
        conditions: condition modalities, anchor first.
        datalist: optional datalist from ``python -m data_prep.brats`` (its subject-level split is used; read
            with the project's checks, :func:`ddcore.datalist.load_datalist`).
        split_mode: ``"auto"`` (slices when there is a single complete subject, else subjects), ``"subjects"`` or
            ``"slices"``.
        heldout_range: slice split: held-out fraction of the brain's S extent.
        gap_mm: slice split: unused margin around the held-out slab.
        val_fraction: subject split without datalist: validation fraction.
        test_fraction: subject split without datalist: test fraction.
        seed: split seed.
        pixdim: resampling spacing (mm) or ``None`` (keep the input's).
        axcodes: orientation.
        lower: normalisation lower percentile.
        upper: normalisation upper percentile.
        min_brain_fraction: training slices need at least this brain fraction.
        multiple: in-plane size multiple (see :func:`size_multiple`).
        slice_size: fixed in-plane size of training slices (``None``: the largest cropped size, rounded up).
        max_subjects: use at most this many subjects per split (0: all).
        reference_path: where to write the target's training intensity reference (``None``: not written).
        tolerance: co-registration tolerance.

    Raises:
        ValueError: invalid settings.
    """

    task_name = "brats"
    generated_by = "damm.tasks (DAMM-Diffusion modality synthesis)"
    unit = "subject"

    def __init__(
        self,
        dataset_dir: str | Path,
        target: str = "flair",
        conditions: Sequence[str] = ("t2", "t1", "t1c"),
        datalist: str | Path | None = None,
        split_mode: str = "auto",
        heldout_range: Sequence[float] = (0.6, 0.8),
        gap_mm: float = 6.0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        pixdim: Sequence[float] | None = None,
        axcodes: str | None = "RAS",
        lower: float = 0.5,
        upper: float = 99.5,
        min_brain_fraction: float = 0.1,
        multiple: int = 16,
        slice_size: Sequence[int] | None = None,
        max_subjects: int = 0,
        reference_path: str | Path | None = None,
        tolerance: float = 1e-3,
    ) -> None:
        if split_mode not in ("auto", "subjects", "slices"):
            raise ValueError(f"split_mode must be 'auto', 'subjects' or 'slices', got {split_mode!r}")
        keys = [target, *conditions]
        unknown = [k for k in keys if k not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown BraTS modalities {unknown}; expected some of {list(MODALITIES)}")
        if len(set(keys)) != len(keys) or not conditions:
            raise ValueError(f"target {target!r} and conditions {list(conditions)} must be distinct and non-empty")
        heldout_slab(np.array([0.0, 1.0]), 1.0, heldout_range, gap_mm)  # validates the fractions
        self.dataset_dir = Path(dataset_dir).expanduser()
        self.datalist = None if datalist in (None, "") else Path(datalist).expanduser()
        self.target, self.conditions = target, list(conditions)
        self.split_mode = split_mode
        self.heldout_range = tuple(float(v) for v in heldout_range)
        self.gap_mm = float(gap_mm)
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.pixdim = None if pixdim is None else [float(p) for p in pixdim]
        self.axcodes = axcodes
        self.lower, self.upper = float(lower), float(upper)
        self.min_brain_fraction = float(min_brain_fraction)
        self.multiple = int(multiple)
        self.slice_size = None if slice_size is None else [int(s) for s in slice_size]
        self.max_subjects = int(max_subjects or 0)
        self.reference_path = None if reference_path is None else Path(reference_path)
        self.tolerance = tolerance
        self._subjects: dict[str, dict[str, Any]] | None = None
        self._items = None

    # ------------------------------------------------------------------ 1. data preparation
    def _datalist_subjects(self) -> dict[str, dict[str, Any]]:
        """Subjects of the datalist, read with the project's checks (:func:`ddcore.datalist.load_datalist`: paths
        made absolute, every configured modality present and existing; ``seg`` too when every item of the split has
        one). Empty or absent splits are skipped."""
        from ddcore.datalist import load_datalist, read_datalist

        data = read_datalist(self.datalist)
        found: dict[str, dict[str, Any]] = {}
        for split in ("training", "validation", "test"):
            items = data.get(split) or []
            if not items:
                continue
            keys = [*self.modalities, *([LABEL_KEY] if all(LABEL_KEY in it for it in items) else [])]
            for item in load_datalist(self.datalist, split, keys):
                files = {k: Path(item[k]) for k in keys}
                found[str(item.get("subject", item.get("id")))] = {"files": files, "split": split}
        return found

    def subjects(self) -> dict[str, dict[str, Any]]:
        """Complete subjects (all configured modalities) with their split.

        Returns:
            ``{subject: {"files": {key: Path}, "split": str}}``.

        Raises:
            ValueError: no complete subject.
            FileNotFoundError: missing folder / datalist / file.
        """
        if self._subjects is not None:
            return self._subjects
        found: dict[str, dict[str, Any]] = {}
        if self.datalist is not None:
            found = self._datalist_subjects()
        else:
            for name, info in find_subjects(self.dataset_dir).items():
                if all(k in info["files"] for k in self.modalities):
                    found[name] = {"files": dict(info["files"]), "split": None}
            if len(found) > 1:
                from ddcore.datalist import assign_splits

                split_of = assign_splits(sorted(found), self.val_fraction, self.test_fraction, self.seed)
                for name in found:
                    found[name]["split"] = split_of[name]
        if not found:
            where = self.datalist or self.dataset_dir
            raise ValueError(f"{where}: no subject has all of {self.modalities}")
        if self.resolved_split_mode(found) == "subjects" and self.max_subjects:
            kept: dict[str, dict[str, Any]] = {}
            for split in ("training", "validation", "test"):
                names = sorted(n for n, s in found.items() if s["split"] == split)[: self.max_subjects]
                kept.update({n: found[n] for n in names})
            found = kept
        self._subjects = dict(sorted(found.items()))
        return self._subjects

    def units(self) -> dict[str, dict[str, Any]]:
        """The subjects (:meth:`subjects`)."""
        return self.subjects()

    def resolved_split_mode(self, subjects: Mapping[str, Any] | None = None) -> str:
        """``"slices"`` or ``"subjects"`` (``"auto"`` resolved).

        Args:
            subjects: the subjects (default: :meth:`subjects`).

        Returns:
            The split mode in use.
        """
        if self.split_mode != "auto":
            return self.split_mode
        subjects = self.subjects() if subjects is None else subjects
        splits = {s["split"] for s in subjects.values()}
        return "subjects" if len(subjects) > 1 and {"training", "test"} <= splits else "slices"

    def check(self) -> dict[str, int]:
        """Check every subject's files (exist, 3D, real-valued, co-registered; the ``seg`` an integer label map)
        before training starts.

        Returns:
            Number of subjects per split.

        Raises:
            ValueError, FileNotFoundError: bad input (names the subject and files).
        """
        counts: dict[str, int] = {}
        mode = self.resolved_split_mode()
        for name, info in self.subjects().items():
            self.check_inputs(name, {k: info["files"][k] for k in [*self.conditions, self.target]})  # anchor first
            for key in [*self.conditions, self.target]:
                check_real_file(info["files"][key], f"subject {name!r}: modality {key!r}")
            seg = info["files"].get(LABEL_KEY)
            if seg is not None and Path(seg).is_file():  # tumour metrics read it at the end: check it now
                check_integer_labels(voxels(seg, LABEL_KEY), f"subject {name!r}: label {LABEL_KEY!r}", str(seg))
            split = "training+test (slice split)" if mode == "slices" else info["split"]
            counts[split] = counts.get(split, 0) + 1
        if mode == "subjects" and not counts.get("training"):
            raise ValueError("subject split: no training subject")
        logger.info(f"BraTS task: {counts} ({mode} split, target {self.target!r} from {self.conditions})")
        return counts

    def _slice_labels(self, name: str, item: Mapping[str, Any], frac: np.ndarray, split: str | None) -> np.ndarray:
        """Split of every axial slice: the held-out slab (slice split) or the subject's split."""
        if self.resolved_split_mode() != "slices":
            return np.full(frac.shape, split, dtype=object)
        aff = affine_of(item[self.target])
        s = slice_s_coords(aff, item[self.target].shape[1:], 2)
        slab = heldout_slab(s[frac > 0], float(np.linalg.norm(aff[:3, 2])), self.heldout_range, self.gap_mm)
        return slab_labels(s, slab)

    def prepare_items(self) -> dict[str, list[dict[str, Any]]]:
        """Axial training slices of every split (padded to one size), and the target's intensity reference.

        Returns:
            ``{split: [{"id", "subject", "slice_index", <modality>: [1, H, W]}]}`` (validation = test slices
            under the slice split; used for monitoring only).

        Raises:
            ValueError: no training slice, or a ``slice_size`` not divisible by ``multiple``.
        """
        mode = self.resolved_split_mode()
        pipe = subject_pipeline(self.modalities, self.pixdim, self.axcodes, self.lower, self.upper, self.tolerance)
        slices: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
        target_params = []
        for name, info in self.subjects().items():
            if mode == "subjects" and info["split"] not in ("training", "validation"):
                continue
            t0 = time.perf_counter()
            item = pipe({k: str(info["files"][k]) for k in self.modalities})
            frac = foreground_fractions(item["brain_mask"], axis=2)
            labels = self._slice_labels(name, item, frac, info["split"])
            if mode == "slices" or info["split"] == "training":
                target_params.append(item[self.target].meta[NORM_META_KEY])
            for z in np.flatnonzero(frac >= self.min_brain_fraction):
                split = labels[z]
                if split == "gap":
                    continue
                rec = {"id": f"{name}_z{z:03d}", "subject": name, "slice_index": int(z)}
                for k in self.modalities:
                    rec[k] = take_slice(item[k], int(z), 2).as_tensor().float()
                slices[split].append(rec)
                if mode == "slices" and split == "test":
                    slices["validation"].append(rec)
            logger.info(f"BraTS task: subject {name} prepared in {time.perf_counter() - t0:.1f} s")
        if mode == "subjects" and slices["training"] and not slices["validation"]:
            # no validation subject (e.g. one training subject, one test subject): the autoencoder's validation
            # monitors a fixed subset of the training slices (reconstruction only; nothing is selected on it)
            slices["validation"] = slices["training"][:: max(1, len(slices["training"]) // 16)]
            logger.info("BraTS task: no validation subject; autoencoder validation monitors training slices")
        if not slices["training"]:
            raise ValueError(
                f"no training slice with a brain fraction >= {self.min_brain_fraction} "
                f"(split {mode}, held-out range {self.heldout_range})"
            )
        sizes = [r[self.target].shape[-2:] for rs in slices.values() for r in rs]
        size = self.slice_size or [
            round_up(max(s[0] for s in sizes), self.multiple),
            round_up(max(s[1] for s in sizes), self.multiple),
        ]
        if any(int(v) % self.multiple for v in size):
            raise ValueError(f"slice_size {size} must be divisible by {self.multiple}")
        for recs in slices.values():
            for r in recs:
                if tuple(r[self.target].shape[-2:]) != tuple(size):
                    for k in self.modalities:
                        r[k] = pad_to(r[k], size, -1.0)[0]
        if self.reference_path is not None and target_params:
            write_intensity_reference(self.reference_path, self.target, target_params)
            atomic_write_json(self.preprocessing_record(), preprocessing_record_path(self.reference_path))
        logger.info(
            "BraTS task slices: " + ", ".join(f"{k}={len(v)}" for k, v in slices.items()) + f" of size {list(size)}"
        )
        return slices

    def preprocessing_record(self) -> dict[str, Any]:
        """The settings a prediction must repeat, as config overrides (read back by ``damm.tasks.impute``).

        Returns:
            ``{"description", "settings": {"target", "conditions", "task_pixdim", "task_axcodes", "task_lower",
            "task_upper"}}``.
        """
        return {
            "description": "preprocessing the model was trained with; damm.tasks.impute applies it unless --set "
            "overrides a key",
            "settings": {
                "target": self.target,
                "conditions": list(self.conditions),
                "task_pixdim": self.pixdim,
                "task_axcodes": self.axcodes,
                "task_lower": self.lower,
                "task_upper": self.upper,
            },
        }

    # ------------------------------------------------------------------ 2. prediction and 3. writing
    def check_inputs(self, name: str, files: Mapping[str, Path]) -> None:
        """Header-only grid check of a subject's files (:func:`check_subject_files`), naming the subject."""
        try:
            check_subject_files(files, self.tolerance)
        except ValueError as err:
            raise ValueError(f"subject {name!r}: {err}") from err

    def prepare(self, files: Mapping[str, str | Path], name: str) -> PreparedSubject:
        """:func:`prepare_subject` with the task's settings."""
        return prepare_subject(
            files, self.conditions, self.target, name, self.pixdim, self.axcodes, self.lower, self.upper, self.tolerance
        )

    def target_intensity(self, prepared: PreparedSubject) -> dict[str, float] | None:
        """The subject's own target range (``None`` without its target)."""
        return prepared.target_params

    def predict(
        self,
        prepared: PreparedSubject,
        predictor: Callable[[torch.Tensor], torch.Tensor],
        intensity: Mapping[str, float],
        use_target: bool = False,
        **options: Any,
    ) -> np.ndarray:
        """:func:`synthesise_subject`: the whole subject on its input grid."""
        return synthesise_subject(prepared, predictor, intensity, self.multiple, use_target)

    def write(self, array: np.ndarray, prepared: PreparedSubject, path: str | Path) -> Path:
        """:func:`write_nifti_like` on the grid of the subject's anchor condition."""
        return write_nifti_like(array, prepared.reference, path)

    def sidecar_settings(self, **options: Any) -> dict[str, Any]:
        """The preprocessing (spacing, orientation, percentiles)."""
        percentiles = [self.lower, self.upper]
        return {"preprocessing": {"pixdim": self.pixdim, "axcodes": self.axcodes, "percentiles": percentiles}}

    # ------------------------------------------------------------------ 4. evaluation
    def evaluation_subjects(self) -> list[tuple[str, dict[str, Path], tuple[float, float] | None]]:
        """Subjects evaluated after training, with the held-out fraction range when slices are held out.

        Returns:
            ``[(subject, files, heldout_range or None)]``: the test subjects (whole brain), or under the slice
            split every subject with its held-out slab.
        """
        mode = self.resolved_split_mode()
        out = []
        for name, info in self.subjects().items():
            if mode == "slices":
                out.append((name, info["files"], self.heldout_range))
            elif info["split"] == "test":
                out.append((name, info["files"], None))
        return out

    def evaluation_cases(self) -> Iterator[EvaluationCase]:
        """Every evaluated subject: truth on the input grid, brain of the held-out slices, tumour when labelled.

        Yields:
            One :class:`~damm.tasks.protocol.EvaluationCase` per subject.
        """
        for name, files, heldout in self.evaluation_subjects():
            prep = self.prepare(files, name)
            region = heldout_mask_input_grid(prep.input_brain, prep.grid["affine"], heldout, self.gap_mm)
            regions: dict[str, Any] = {"brain": prep.input_brain & region}
            if LABEL_KEY in files and Path(files[LABEL_KEY]).is_file():
                labels = voxels(files[LABEL_KEY], LABEL_KEY)
                check_integer_labels(labels, f"label {LABEL_KEY!r}", str(files[LABEL_KEY]))
                tumour = (labels > 0) & regions["brain"]
                regions["tumour"] = tumour if tumour.any() else None
            lo, hi = prep.target_params["lower"], prep.target_params["upper"]
            yield EvaluationCase(
                name=name,
                files=dict(files),
                prepared=prep,
                truth=to_unit(voxels(files[self.target], self.target), lo, hi),
                regions=regions,
                intensity=prep.target_params,
                output=f"{name}/{{method}}_{self.target}.nii.gz",
                axis=2,
            )

    def evaluation_settings(self, **options: Any) -> dict[str, Any]:
        """Split, held-out slab, spacing, and whether every evaluated subject has a tumour label."""
        subjects = self.evaluation_subjects()
        return {
            "split_mode": self.resolved_split_mode(),
            "heldout_range": list(self.heldout_range),
            "gap_mm": self.gap_mm,
            "pixdim": self.pixdim,
            "tumour_region": all(LABEL_KEY in f and Path(f[LABEL_KEY]).is_file() for _, f, _ in subjects),
        }

    def metric_space(self, ssim_win_size: int) -> str:
        """Input grid, target's brain-percentile range, SSIM per axial slice."""
        return (
            "input grid, both images mapped to [0, 1] with the target's brain-percentile range "
            f"[p{self.lower}, p{self.upper}]; PSNR max 1; SSIM Gaussian window {ssim_win_size} per axial slice; "
            "averages over the region's voxels"
        )

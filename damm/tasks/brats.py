"""Brain MRI modality synthesis (BraTS-style): slice training data, whole-subject inference, masked evaluation.

Protocol (our own design; the paper's BraTS protocol is unknown, damm.md §4.2):

- **Modalities.** Target and conditions come from the config (default: ``flair`` from ``t2`` (anchor, uni-modal
  branch), ``t1`` and ``t1c`` (auxiliary)).
- **Preprocessing.** :func:`transforms.pipelines.brats_volume_pipeline`: orientation (``RAS``), optional
  resampling (``pixdim``, e.g. 2 mm for CPU runs), brain mask = union of non-zero voxels, crop to the brain, and
  per-modality brain-mask percentile normalisation to ``[-1, 1]``.
- **Training data.** Axial 2D slices whose brain fraction is at least ``min_brain_fraction``, padded (background
  ``-1``) to one in-plane size divisible by the autoencoder x denoiser downsampling.
- **Splits.** With several subjects the datalist's (or a seeded) *subject-level* split is used. With a single
  subject (or when ``split_mode="slices"``) a *slice-level* split is used instead: the slices whose centre lies in
  the fraction ``heldout_range`` of the brain's superior-inferior extent are held out (test, and validation for
  monitoring only); slices within ``gap_mm`` of that slab are used for nothing (neighbouring slices are nearly
  identical), the rest train. The same slab, in mm, selects the evaluated slices on the input grid.
- **Inference.** Whole subject: every slice that holds brain is synthesised (batched), the slices are stacked
  back into the cropped volume, intensities mapped back to the input scale, the volume resampled onto the
  **input grid** (``ResampleToMatch``) and written as NIfTI with the input's affine and header.
- **Evaluation.** On the input grid, inside the brain (union of the source modalities) of the held-out slices
  (and within the tumour label when a ``seg`` exists): PSNR, SSIM, MAE after mapping both images to ``[0, 1]``
  with the target's normalisation range (:mod:`damm.tasks.metrics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import LoadImage, ResampleToMatch

from damm.tasks.common import (
    AutoencoderCeiling,
    DAMMPredictor,
    evaluation_methods,
    format_results_table,
    model_fingerprint,
    pop_branch_statistics,
    read_intensity_reference,
    write_intensity_reference,
    write_task_evaluation,
)
from damm.tasks.metrics import region_metrics, to_unit
from data_prep.brats import LABEL_KEY, MODALITIES, SCHEMES, detect_scheme, find_subjects, modality_filename
from data_prep.datalist import assign_splits, read_datalist
from ddcore.atomic import atomic_path, atomic_write_json
from transforms.checks import affine_of
from transforms.intensity import NORM_META_KEY, denormalise
from transforms.pipelines import brats_volume_pipeline
from transforms.slices import foreground_fractions, take_slice

__all__ = [
    "BraTSTaskData",
    "PreparedSubject",
    "SubjectInference",
    "check_subject_files",
    "evaluate_task",
    "format_results_table",
    "heldout_slab",
    "predict_volume",
    "prepare_subject",
    "size_multiple",
    "subject_files",
    "synthesise_subject",
    "to_input_grid",
    "write_nifti_like",
]

logger = logging.getLogger(__name__)

_NII = (".nii", ".nii.gz")


# ---------------------------------------------------------------------------------------------------- files
def subject_files(folder: str | Path) -> dict[str, Any]:
    """Modality files of one subject folder, in any supported naming scheme (:data:`data_prep.brats.SCHEMES`).

    Args:
        folder: the subject's folder.

    Returns:
        ``{"subject", "folder", "scheme", "file_prefix", "files": {key: Path}}``.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: no BraTS-style file, mixed schemes or prefixes, a modality given twice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"subject folder not found: {folder}")
    names = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower().endswith(_NII)]
    try:
        scheme = detect_scheme(names)
    except ValueError as err:
        raise ValueError(f"subject folder {folder}: {err}") from err
    spec = SCHEMES[scheme]
    inverse = {tag: key for key, tag in spec["tags"].items()}
    files: dict[str, Path] = {}
    prefixes = set()
    for p in names:
        m = spec["regex"].match(p.name)
        if m is None:
            continue
        key = inverse[m.group("tag").lower()]
        if key in files:
            raise ValueError(f"subject folder {folder}: modality {key!r} given twice ({files[key].name}, {p.name})")
        files[key] = p
        prefixes.add(m.groupdict().get("subject") or "")
    if len(prefixes) > 1:
        raise ValueError(f"subject folder {folder}: files with different subject prefixes {sorted(prefixes)}")
    return {"subject": folder.name, "folder": folder, "scheme": scheme, "file_prefix": prefixes.pop(), "files": files}


def _scheme_of(path: str | Path) -> tuple[str, str]:
    """(naming scheme, subject file prefix) of one modality file (``("plain", "")`` when none matches)."""
    for scheme, spec in SCHEMES.items():
        m = spec["regex"].match(Path(path).name)
        if m:
            return scheme, m.groupdict().get("subject") or ""
    return "plain", ""


def check_subject_files(files: Mapping[str, str | Path], tolerance: float = 1e-3) -> dict[str, Any]:
    """Check (headers only, before any work) that the files exist, are 3D and share one voxel grid.

    Args:
        files: ``{modality: path}``.
        tolerance: on spacing (mm), direction cosines and origin (mm).

    Returns:
        ``{"shape", "affine"}`` of the common grid.

    Raises:
        FileNotFoundError: a missing file.
        ValueError: unreadable, not 3D, or not co-registered (names every file with its shape and spacing).
    """
    geo: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
    for key, path in files.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"modality {key!r}: file not found: {path}")
        try:
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
        except Exception as err:
            raise ValueError(f"modality {key!r}: cannot read {path}: {type(err).__name__}: {err}") from err
        if len(shape) != 3:
            raise ValueError(f"modality {key!r}: {path} is {len(shape)}D {shape}; expected a 3D volume")
        geo[key] = (shape, affine)
    ref = next(iter(geo))
    bad = [k for k, (s, a) in geo.items() if s != geo[ref][0] or not np.allclose(a, geo[ref][1], atol=tolerance)]
    if bad:
        desc = "; ".join(
            f"{k}: {Path(files[k]).name} shape={s} spacing={np.round(np.linalg.norm(a[:3, :3], axis=0), 4).tolist()} "
            f"origin={np.round(a[:3, 3], 2).tolist()}"
            for k, (s, a) in geo.items()
        )
        raise ValueError(
            f"modalities {bad} are not co-registered with {ref!r} (different voxel grids); resample them onto one "
            f"grid first. Files: {desc}"
        )
    return {"shape": geo[ref][0], "affine": geo[ref][1]}


def size_multiple(ae_channels: Sequence[int], dm_channels: Sequence[int]) -> int:
    """In-plane size multiple needed by the autoencoder (``2**(levels-1)``) and the denoiser (``2**(levels-2)``).

    Args:
        ae_channels: autoencoder channels per level.
        dm_channels: denoiser channels per level.

    Returns:
        The product of both downsampling factors.
    """
    return 2 ** (len(ae_channels) - 1) * 2 ** max(len(dm_channels) - 2, 0)


# ---------------------------------------------------------------------------------------------------- geometry
def _axial_axis(affine: np.ndarray) -> int:
    """Voxel axis most aligned with the superior-inferior world axis (RAS/LPS row 2)."""
    return int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))


def _slice_s_coords(affine: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
    """World S coordinate (mm) of the centre of every slice along ``axis``."""
    centre = np.array([(s - 1) / 2.0 for s in shape[:3]], dtype=np.float64)
    idx = np.arange(shape[axis], dtype=np.float64)
    pts = np.repeat(centre[None], len(idx), axis=0)
    pts[:, axis] = idx
    return pts @ affine[2, :3] + affine[2, 3]


def heldout_slab(
    brain_s: np.ndarray, spacing_s: float, heldout_range: Sequence[float], gap_mm: float
) -> tuple[float, float, float]:
    """The held-out slab in world S coordinates (mm).

    Args:
        brain_s: S coordinates of the slices that hold brain.
        spacing_s: slice spacing (mm).
        heldout_range: ``(a, b)`` fractions of the brain's S extent (0 = lowest brain edge).
        gap_mm: margin around the slab excluded from training.

    Returns:
        ``(lo, hi, gap_mm)``: slices with ``lo <= S <= hi`` are held out; those within ``gap_mm`` of it are unused.

    Raises:
        ValueError: invalid fractions.
    """
    a, b = (float(v) for v in heldout_range)
    if not 0.0 <= a < b <= 1.0:
        raise ValueError(f"heldout_range must be two fractions 0 <= a < b <= 1, got {list(heldout_range)}")
    s_lo, s_hi = float(brain_s.min()) - spacing_s / 2, float(brain_s.max()) + spacing_s / 2
    return s_lo + a * (s_hi - s_lo), s_lo + b * (s_hi - s_lo), float(gap_mm)


def _slab_labels(s: np.ndarray, slab: tuple[float, float, float]) -> np.ndarray:
    lo, hi, gap = slab
    out = np.full(s.shape, "training", dtype=object)
    out[(s >= lo - gap) & (s <= hi + gap)] = "gap"
    out[(s >= lo) & (s <= hi)] = "test"
    return out


# ---------------------------------------------------------------------------------------------------- preprocessing
@dataclass
class PreparedSubject:
    """A subject after the volume pipeline, ready for slice-wise inference.

    Attributes:
        subject: subject id.
        files: ``{modality: path}`` of the inputs used.
        conditions: ``{modality: [1, X, Y, Z] MetaTensor}`` (conditions-only pipeline, as in real use).
        brain: brain mask of the conditions' pipeline ``[1, X, Y, Z]``.
        target: true target in the pipeline space of ``target_item`` (``None`` when absent).
        target_brain: brain mask of that pipeline.
        target_params: the target's normalisation parameters (``None`` when absent).
        reference: path of the file whose grid the outputs take (the anchor condition).
        grid: ``{"shape", "affine"}`` of the input grid.
    """

    subject: str
    files: dict[str, Path]
    conditions: dict[str, Any]
    brain: Any
    target: Any = None
    target_brain: Any = None
    target_params: dict[str, float] | None = None
    reference: Path | None = None
    grid: dict[str, Any] = field(default_factory=dict)


def _pipeline(keys: Sequence[str], pixdim: Any, axcodes: str | None, lower: float, upper: float, tol: float):
    return brats_volume_pipeline(
        list(keys),
        axcodes=axcodes,
        pixdim=None if pixdim is None else [float(p) for p in pixdim],
        lower=lower,
        upper=upper,
        crop_foreground=True,
        coregistration_tol=tol,
    )


def prepare_subject(
    files: Mapping[str, str | Path],
    conditions: Sequence[str],
    target: str | None = None,
    subject: str = "subject",
    pixdim: Sequence[float] | None = None,
    axcodes: str | None = "RAS",
    lower: float = 0.5,
    upper: float = 99.5,
    tolerance: float = 1e-3,
) -> PreparedSubject:
    """Check and preprocess one subject for inference (and, when its target file is given, for evaluation).

    Args:
        files: ``{modality: path}``; must hold every condition, may hold the target.
        conditions: condition modalities, anchor first.
        target: target modality (used only when present in ``files``).
        subject: id for messages and outputs.
        pixdim: resampling spacing (mm) or ``None``.
        axcodes: orientation.
        lower: normalisation lower percentile (in the brain).
        upper: normalisation upper percentile.
        tolerance: co-registration tolerance.

    Returns:
        :class:`PreparedSubject`.

    Raises:
        ValueError: a missing condition modality or files not on one grid (before anything is loaded).
        FileNotFoundError: a missing file.
    """
    missing = [k for k in conditions if k not in files]
    if missing:
        raise ValueError(
            f"subject {subject!r}: missing source modalities {missing}; the model needs {list(conditions)}, "
            f"found {sorted(files)}"
        )
    use = {k: Path(files[k]) for k in conditions}
    has_target = target is not None and target in files
    if has_target:
        use[target] = Path(files[target])
    grid = check_subject_files(use, tolerance)
    cond_item = _pipeline(conditions, pixdim, axcodes, lower, upper, tolerance)({k: str(use[k]) for k in conditions})
    prep = PreparedSubject(
        subject=subject,
        files=use,
        conditions={k: cond_item[k] for k in conditions},
        brain=cond_item["brain_mask"],
        reference=use[conditions[0]],
        grid=grid,
    )
    if has_target:
        keys = [*conditions, target]
        item = _pipeline(keys, pixdim, axcodes, lower, upper, tolerance)({k: str(use[k]) for k in keys})
        prep.target = item[target]
        prep.target_brain = item["brain_mask"]
        params = item[target].meta[NORM_META_KEY]
        prep.target_params = {"lower": float(params["lower"]), "upper": float(params["upper"])}
    return prep


# ---------------------------------------------------------------------------------------------------- inference
def _pad_to(x: torch.Tensor, size: Sequence[int], value: float) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad ``[..., H, W]`` (centred) to ``size``; returns the padded tensor and (top, bottom, left, right)."""
    h, w = x.shape[-2:]
    dh, dw = int(size[0]) - h, int(size[1]) - w
    if dh < 0 or dw < 0:
        raise ValueError(f"slice of size {(h, w)} is larger than the padded size {tuple(size)}")
    pads = (dh // 2, dh - dh // 2, dw // 2, dw - dw // 2)
    return F.pad(x, (pads[2], pads[3], pads[0], pads[1]), value=value), pads


def _round_up(n: int, m: int) -> int:
    return int(-(-int(n) // int(m)) * int(m))


def predict_volume(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    volumes: Sequence[Any],
    brain: Any,
    multiple: int = 16,
) -> MetaTensor:
    """Synthesise every axial slice holding brain (one batched predictor call) and stack them into a volume.

    Args:
        predictor: ``[N, n_in, H, W] -> [N, 1, H, W]`` in ``[-1, 1]``.
        volumes: the predictor's inputs, each ``[1, X, Y, Z]`` (conditions anchor first, or the true target for
            the autoencoder ceiling).
        brain: brain mask ``[1, X, Y, Z]``; slices without brain and voxels outside it are background (``-1``).
        multiple: in-plane sizes are padded (with ``-1``) to a multiple of this.

    Returns:
        ``[1, X, Y, Z]`` MetaTensor with the geometry (affine) of ``volumes[0]``.
    """
    ref = volumes[0]
    frac = foreground_fractions(brain, axis=2)
    z_idx = np.flatnonzero(frac > 0)
    x = torch.cat([torch.as_tensor(v).float() for v in volumes], dim=0)  # [n_in, X, Y, Z]
    slices = x.permute(3, 0, 1, 2)[torch.as_tensor(z_idx)]  # [N, n_in, X, Y]
    size = (_round_up(slices.shape[-2], multiple), _round_up(slices.shape[-1], multiple))
    padded, (t, b, left, r) = _pad_to(slices, size, -1.0)
    with torch.no_grad():
        pred = predictor(padded).float().cpu()
    pred = pred[..., t : size[0] - b, left : size[1] - r]
    out = torch.full((1, *x.shape[1:]), -1.0)
    out[..., torch.as_tensor(z_idx)] = pred[:, :1].permute(1, 2, 3, 0)
    out = torch.where(torch.as_tensor(brain) > 0, out, torch.full_like(out, -1.0))
    return MetaTensor(
        out, affine=torch.as_tensor(affine_of(ref)), meta={"space": getattr(ref, "meta", {}).get("space", "RAS")}
    )


def to_input_grid(
    prediction: MetaTensor, brain: Any, intensity: Mapping[str, float], reference: str | Path, input_brain: Any = None
) -> np.ndarray:
    """Map a ``[-1, 1]`` prediction back to the input scale and resample it onto the reference file's voxel grid.

    Args:
        prediction: ``[1, X, Y, Z]`` in pipeline space (with its affine).
        brain: brain mask in pipeline space (outside -> 0).
        intensity: ``{"lower", "upper"}`` of the target's normalisation (``-1 -> lower``, ``1 -> upper``).
        reference: the input file whose grid the output takes.
        input_brain: optional brain mask on the input grid (outside -> 0).

    Returns:
        ``[X0, Y0, Z0]`` float32 array in the reference's voxel order, ``>= 0``.
    """
    params = {"lower": float(intensity["lower"]), "upper": float(intensity["upper"]), "out_min": -1.0, "out_max": 1.0}
    vol = denormalise(prediction.as_tensor().float(), params)
    vol = torch.where(torch.as_tensor(brain) > 0, vol, torch.zeros_like(vol)).clamp_min(0.0)
    meta = {k: v for k, v in prediction.meta.items() if k not in ("affine", "original_affine")}
    img = MetaTensor(vol, affine=prediction.affine, meta=meta)
    dst = _load_reference(reference)
    out = ResampleToMatch(mode="bilinear", padding_mode="zeros")(img, img_dst=dst)
    arr = torch.as_tensor(out).float().numpy()[0]
    if input_brain is not None:
        arr = np.where(np.asarray(input_brain) > 0, arr, 0.0)
    return np.clip(arr, 0.0, None).astype(np.float32)


_REFERENCE_CACHE: dict[str, Any] = {}


def _load_reference(reference: str | Path) -> Any:
    """The reference file as a channel-first MetaTensor (cached by path and modification time)."""
    p = Path(reference)
    key = f"{p.resolve()}:{p.stat().st_mtime_ns}"
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE.clear()
        _REFERENCE_CACHE[key] = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(str(p))
    return _REFERENCE_CACHE[key]


def write_nifti_like(array: np.ndarray, reference: str | Path, path: str | Path) -> Path:
    """Write ``array`` as NIfTI with the reference file's affine and header geometry (float32 data), atomically.

    Args:
        array: volume on the reference grid.
        reference: the input file.
        path: destination (``.nii.gz`` or ``.nii``).

    Returns:
        ``path``.

    Raises:
        ValueError: the shape differs from the reference.
    """
    ref = nib.load(str(reference))
    if tuple(array.shape) != tuple(ref.shape):
        raise ValueError(f"write_nifti_like: array shape {array.shape} != reference {ref.shape} ({reference})")
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), ref.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    qform, qcode = ref.header.get_qform(coded=True)
    sform, scode = ref.header.get_sform(coded=True)
    img.set_qform(qform if qform is not None else ref.affine, int(qcode) if qcode is not None else 1)
    img.set_sform(sform if sform is not None else ref.affine, int(scode) if scode is not None else 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def _input_brain(files: Mapping[str, Path], conditions: Sequence[str]) -> np.ndarray:
    mask = None
    for k in conditions:
        m = np.asarray(nib.load(str(files[k])).dataobj) > 0
        mask = m if mask is None else mask | m
    return mask


# ---------------------------------------------------------------------------------------------------- task data
class BraTSTaskData:
    """Training slices and evaluation subjects of a BraTS-style dataset, with the configured split.

    Work is lazy (nothing is read until :meth:`items` / :meth:`evaluation_subjects` / :meth:`check`).

    Args:
        dataset_dir: folder of subjects (any naming scheme), used when ``datalist`` is ``None``.
        target: target modality.
        conditions: condition modalities, anchor first.
        datalist: optional datalist from ``python -m data_prep.brats`` (its subject-level split is used).
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
        self._items: dict[str, list[dict[str, Any]]] | None = None

    @property
    def modalities(self) -> list[str]:
        """Target first, then the conditions."""
        return [self.target, *self.conditions]

    # ------------------------------------------------------------------ subjects and split
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
            data = read_datalist(self.datalist)
            base = self.datalist.resolve().parent
            for split in ("training", "validation", "test"):
                for item in data.get(split, []):
                    if all(k in item for k in self.modalities):
                        files = {
                            k: (Path(item[k]) if Path(item[k]).is_absolute() else base / item[k])
                            for k in (*self.modalities, LABEL_KEY)
                            if k in item
                        }
                        found[str(item.get("subject", item.get("id")))] = {"files": files, "split": split}
        else:
            for name, info in find_subjects(self.dataset_dir).items():
                if all(k in info["files"] for k in self.modalities):
                    found[name] = {"files": dict(info["files"]), "split": None}
            if len(found) > 1:
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
        """Check every subject's files (exist, 3D, co-registered) before training starts.

        Returns:
            Number of subjects per split.

        Raises:
            ValueError, FileNotFoundError: bad input (names the subject and files).
        """
        counts: dict[str, int] = {}
        mode = self.resolved_split_mode()
        for name, info in self.subjects().items():
            try:
                check_subject_files({k: info["files"][k] for k in self.modalities}, self.tolerance)
            except ValueError as err:
                raise ValueError(f"subject {name!r}: {err}") from err
            split = "training+test (slice split)" if mode == "slices" else info["split"]
            counts[split] = counts.get(split, 0) + 1
        if mode == "subjects" and not counts.get("training"):
            raise ValueError("subject split: no training subject")
        logger.info(f"BraTS task: {counts} ({mode} split, target {self.target!r} from {self.conditions})")
        return counts

    # ------------------------------------------------------------------ training items
    def _prepare(self) -> dict[str, list[dict[str, Any]]]:
        if self._items is not None:
            return self._items
        mode = self.resolved_split_mode()
        pipe = _pipeline(self.modalities, self.pixdim, self.axcodes, self.lower, self.upper, self.tolerance)
        slices: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
        target_params = []
        for name, info in self.subjects().items():
            if mode == "subjects" and info["split"] not in ("training", "validation"):
                continue
            t0 = time.perf_counter()
            item = pipe({k: str(info["files"][k]) for k in self.modalities})
            frac = foreground_fractions(item["brain_mask"], axis=2)
            if mode == "slices":
                aff = affine_of(item[self.target])
                s = _slice_s_coords(aff, item[self.target].shape[1:], 2)
                slab = heldout_slab(s[frac > 0], float(np.linalg.norm(aff[:3, 2])), self.heldout_range, self.gap_mm)
                labels = _slab_labels(s, slab)
            else:
                labels = np.full(frac.shape, info["split"], dtype=object)
            if (mode == "subjects" and info["split"] == "training") or mode == "slices":
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
        if not slices["training"]:
            raise ValueError(
                f"no training slice with a brain fraction >= {self.min_brain_fraction} "
                f"(split {mode}, held-out range {self.heldout_range})"
            )
        sizes = [r[self.target].shape[-2:] for rs in slices.values() for r in rs]
        size = self.slice_size or [
            _round_up(max(s[0] for s in sizes), self.multiple),
            _round_up(max(s[1] for s in sizes), self.multiple),
        ]
        if any(int(v) % self.multiple for v in size):
            raise ValueError(f"slice_size {size} must be divisible by {self.multiple}")
        for recs in slices.values():
            for r in recs:
                if r[self.target].shape[-1] == size[1] and r[self.target].shape[-2] == size[0]:
                    continue
                for k in self.modalities:
                    r[k] = _pad_to(r[k], size, -1.0)[0]
        if self.reference_path is not None and target_params:
            write_intensity_reference(self.reference_path, self.target, target_params)
        logger.info(
            "BraTS task slices: " + ", ".join(f"{k}={len(v)}" for k, v in slices.items()) + f" of size {list(size)}"
        )
        self._items = slices
        return slices

    def items(self, split: str) -> list[dict[str, Any]]:
        """In-memory slice items ``{"id", "subject", "slice_index", <modality>: [1, H, W]}`` of a split.

        Args:
            split: ``"training"``, ``"validation"`` or ``"test"``.

        Returns:
            The items (validation = test slices under the slice split; used for monitoring only).

        Raises:
            ValueError: unknown or empty split.
        """
        slices = self._prepare()
        if split not in slices:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(slices)}")
        if not slices[split]:
            raise ValueError(f"BraTS task: split {split!r} has no slice")
        return slices[split]

    # ------------------------------------------------------------------ evaluation
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


# ---------------------------------------------------------------------------------------------------- evaluation
def _heldout_mask_input_grid(
    brain: np.ndarray, affine: np.ndarray, heldout_range: Sequence[float] | None, gap_mm: float
) -> np.ndarray:
    """Voxels of the held-out slab on the input grid (all voxels when ``heldout_range`` is None)."""
    if heldout_range is None:
        return np.ones(brain.shape, dtype=bool)
    axis = _axial_axis(affine)
    s = _slice_s_coords(affine, brain.shape, axis)
    has_brain = brain.any(axis=tuple(i for i in range(3) if i != axis))
    spacing = float(np.linalg.norm(affine[:3, axis]))
    lo, hi, _ = heldout_slab(s[has_brain], spacing, heldout_range, gap_mm)
    sel = (s >= lo) & (s <= hi)
    shape = [1, 1, 1]
    shape[axis] = -1
    return np.broadcast_to(sel.reshape(shape), brain.shape)


def synthesise_subject(
    prep: PreparedSubject,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    intensity: Mapping[str, float],
    multiple: int = 16,
    use_target: bool = False,
    input_brain: np.ndarray | None = None,
) -> np.ndarray:
    """Whole-subject synthesis on the input grid (input intensity scale).

    Args:
        prep: the prepared subject.
        predictor: predictor callable (or the autoencoder ceiling when ``use_target``).
        intensity: ``{"lower", "upper"}`` mapping ``[-1, 1]`` back to the input scale.
        multiple: in-plane size multiple.
        use_target: feed the true target (autoencoder ceiling) instead of the conditions.
        input_brain: brain mask on the input grid (default: union of the conditions' non-zero voxels).

    Returns:
        ``[X0, Y0, Z0]`` float32 volume on the reference grid.
    """
    if use_target:
        if prep.target is None:
            raise ValueError(f"subject {prep.subject!r}: no target image for the autoencoder ceiling")
        vol = predict_volume(predictor, [prep.target], prep.target_brain, multiple)
        brain = prep.target_brain
    else:
        vol = predict_volume(predictor, list(prep.conditions.values()), prep.brain, multiple)
        brain = prep.brain
    if input_brain is None:
        input_brain = _input_brain(prep.files, list(prep.conditions))
    return to_input_grid(vol, brain, intensity, prep.reference, input_brain)


def evaluate_task(
    model: Any,
    inferer: Any,
    task: BraTSTaskData,
    output_dir: str | Path,
    model_path: str | Path | None = None,
    branches: Sequence[str] = ("damm", "uni", "multi"),
    extra_predictors: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ssim_win_size: int = 7,
    write_volumes: bool = True,
    load: bool = True,
) -> dict[str, Any]:
    """Whole-subject evaluation of every method on the held-out data (the ``training`` run id's last step).

    Methods: the target autoencoder's reconstruction (ceiling), the gated DAMM prediction and each branch alone
    (same sampler settings), plus any ``extra_predictors`` (e.g. the UNet baseline). Metrics per region (brain of
    the held-out slices, tumour when a ``seg`` exists) on the input grid; JSON and markdown written atomically.

    Args:
        model: :class:`damm.workflow.DAMMModel`.
        inferer: :class:`damm.inferers.DAMMInferer`.
        task: the task data.
        output_dir: output folder (``task_evaluation.json``, ``task_evaluation.md``, NIfTI predictions).
        model_path: checkpoint to load first (when ``load``) and to record.
        branches: DAMM branches to evaluate.
        extra_predictors: other methods ``{name: predictor}``.
        ssim_win_size: SSIM window.
        write_volumes: write each method's prediction as NIfTI (``<subject>/<method>_<target>.nii.gz``).
        load: load ``model_path`` into ``model`` first (the trained weights of the ``training`` run).

    Returns:
        The results dict.
    """
    from damm.workflow import load_model

    if load and model_path is not None:
        load_model(model, model_path)
    model.eval()
    output_dir = Path(output_dir)
    results: dict[str, Any] = {
        "task": "brats",
        "target": task.target,
        "conditions": task.conditions,
        "split_mode": task.resolved_split_mode(),
        "heldout_range": list(task.heldout_range),
        "gap_mm": task.gap_mm,
        "pixdim": task.pixdim,
        "sampler": inferer.settings(),
        "model": model_fingerprint(model_path),
        "metric_space": "input grid, both images mapped to [0, 1] with the target's brain-percentile range "
        f"[p{task.lower}, p{task.upper}]; PSNR max 1; SSIM Gaussian window {ssim_win_size} per axial slice; "
        "averages over the region's voxels",
        "subjects": {},
    }
    methods = evaluation_methods(model, inferer, branches, extra_predictors)
    seg_available = True
    for name, files, heldout in task.evaluation_subjects():
        prep = prepare_subject(
            files, task.conditions, task.target, name, task.pixdim, task.axcodes, task.lower, task.upper, task.tolerance
        )
        target_img = nib.load(str(files[task.target]))
        true = np.asarray(target_img.dataobj, dtype=np.float32)
        in_brain = _input_brain(prep.files, task.conditions)
        region = _heldout_mask_input_grid(in_brain, prep.grid["affine"], heldout, task.gap_mm)
        regions: dict[str, Any] = {"brain": in_brain & region}
        if LABEL_KEY in files and Path(files[LABEL_KEY]).is_file():
            seg = np.asarray(nib.load(str(files[LABEL_KEY])).dataobj) > 0
            regions["tumour"] = seg & regions["brain"] if (seg & regions["brain"]).any() else None
        else:
            seg_available = False
        lo, hi = prep.target_params["lower"], prep.target_params["upper"]
        true_u = to_unit(true, lo, hi)
        subj: dict[str, Any] = {"files": {k: str(v) for k, v in files.items()}, "methods": {}}
        for method, predictor in methods.items():
            t0 = time.perf_counter()
            if method == "autoencoder_ceiling":
                pred = synthesise_subject(
                    prep,
                    AutoencoderCeiling(model.autoencoders[task.target], inferer.batch_size or 32, inferer.precision),
                    prep.target_params,
                    task.multiple,
                    use_target=True,
                    input_brain=in_brain,
                )
            else:
                pred = synthesise_subject(prep, predictor, prep.target_params, task.multiple, input_brain=in_brain)
            secs = time.perf_counter() - t0
            rec: dict[str, Any] = {"seconds": secs}
            rec.update(region_metrics(to_unit(pred, lo, hi), true_u, regions, win_size=ssim_win_size, axis=2))
            pop_branch_statistics(predictor, rec)
            subj["methods"][method] = rec
            if write_volumes:
                write_nifti_like(pred, prep.reference, output_dir / name / f"{method}_{task.target}.nii.gz")
            logger.info(f"{name} {method}: {rec.get('brain')} ({secs:.1f} s)")
        results["subjects"][name] = subj
    results["tumour_region"] = seg_available
    return write_task_evaluation(results, output_dir)


# ---------------------------------------------------------------------------------------------------- inference runner
class SubjectInference:
    """Whole-subject inference for the bundle's ``inference`` run id (the ``evaluator`` of the task overlay).

    For every subject (the task's subjects, or the subject folders in ``input_dirs``) the target is synthesised
    from the conditions and written as ``<output_dir>/<subject>/<scheme file name of the target>`` with a JSON
    sidecar. When the true target exists it is only used to map intensities back (and never overwritten).

    Args:
        model: the loaded :class:`damm.workflow.DAMMModel`.
        inferer: the sampler.
        output_dir: output folder.
        task: the task data (its settings and subjects), or ``None`` with ``input_dirs``.
        input_dirs: subject folders to process instead of the task's subjects.
        intensity_reference: JSON written at training (``models/target_intensity.json``).
        model_path: checkpoint path recorded in the sidecar.
        overwrite: replace existing outputs.
    """

    def __init__(
        self,
        model: Any,
        inferer: Any,
        output_dir: str | Path,
        task: BraTSTaskData,
        input_dirs: Sequence[str | Path] | None = None,
        intensity_reference: str | Path | None = None,
        model_path: str | Path | None = None,
        overwrite: bool = False,
    ) -> None:
        self.model = model
        self.inferer = inferer
        self.output_dir = Path(output_dir)
        self.task = task
        self.input_dirs = [Path(p) for p in input_dirs] if input_dirs else None
        self.intensity_reference = intensity_reference
        self.model_path = model_path
        self.overwrite = overwrite

    def _jobs(self) -> list[tuple[str, dict[str, Path], str, str]]:
        jobs = []
        if self.input_dirs:
            for d in self.input_dirs:
                info = subject_files(d)
                jobs.append((info["subject"], info["files"], info["scheme"], info["file_prefix"]))
        else:
            for name, info in self.task.subjects().items():
                scheme, prefix = _scheme_of(info["files"][self.task.conditions[0]])
                jobs.append((name, info["files"], scheme, prefix))
        return jobs

    def run(self) -> list[Path]:
        """Synthesise every subject.

        Returns:
            The written NIfTI paths.
        """
        written = []
        jobs = self._jobs()
        for name, files, scheme, prefix in jobs:  # check everything before the first synthesis
            out = self.output_dir / name / modality_filename(scheme, self.task.target, prefix)
            if out.exists() and not self.overwrite:
                raise FileExistsError(f"output {out} exists; set overwrite to replace it")
            prepare_check = {k: files[k] for k in self.task.conditions if k in files}
            if len(prepare_check) < len(self.task.conditions):
                missing = [k for k in self.task.conditions if k not in files]
                raise ValueError(f"subject {name!r}: missing source modalities {missing} (found {sorted(files)})")
            check_subject_files(prepare_check, self.task.tolerance)
        for name, files, scheme, prefix in jobs:
            out = self.output_dir / name / modality_filename(scheme, self.task.target, prefix)
            written.append(
                synthesise_to_file(
                    self.model,
                    self.inferer,
                    {k: files[k] for k in self.task.conditions},
                    out,
                    self.task,
                    subject=name,
                    intensity_reference=self.intensity_reference,
                    true_target=files.get(self.task.target),
                    model_path=self.model_path,
                )
            )
        return written


def synthesise_to_file(
    model: Any,
    inferer: Any,
    condition_files: Mapping[str, str | Path],
    out_path: str | Path,
    task: BraTSTaskData,
    subject: str = "subject",
    intensity_reference: str | Path | Mapping[str, float] | None = None,
    true_target: str | Path | None = None,
    model_path: str | Path | None = None,
    extra_sidecar: Mapping[str, Any] | None = None,
) -> Path:
    """Synthesise one subject's target and write it (NIfTI on the input grid) plus a JSON sidecar.

    Args:
        model: the loaded model.
        inferer: the sampler.
        condition_files: ``{condition: path}``.
        out_path: NIfTI destination (the sidecar is ``<stem>.json`` beside it).
        task: task settings (target, conditions, pixdim, orientation, percentiles).
        subject: subject id.
        intensity_reference: ``{"lower", "upper"}`` or the JSON written at training; used unless ``true_target``.
        true_target: the real target file, if any (its intensity range is then used).
        model_path: checkpoint recorded in the sidecar.
        extra_sidecar: more sidecar fields.

    Returns:
        ``out_path``.

    Raises:
        ValueError: no way to map intensities back.
    """
    t0 = time.perf_counter()
    files = dict(condition_files)
    if true_target is not None:
        files[task.target] = true_target
    prep = prepare_subject(
        files, task.conditions, task.target, subject, task.pixdim, task.axcodes, task.lower, task.upper, task.tolerance
    )
    if prep.target_params is not None:
        intensity, source = prep.target_params, f"the subject's real {task.target}"
    elif isinstance(intensity_reference, Mapping):
        intensity, source = dict(intensity_reference), "given"
    elif intensity_reference is not None:
        intensity, source = read_intensity_reference(intensity_reference, task.target), str(intensity_reference)
    else:
        raise ValueError("no intensity reference: give the training reference JSON (models/target_intensity.json)")
    predictor = DAMMPredictor(model, inferer)
    pred = synthesise_subject(prep, predictor, intensity, task.multiple)
    out_path = Path(out_path)
    write_nifti_like(pred, prep.reference, out_path)
    name = out_path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
    sidecar = {
        "generated_by": "damm.tasks (DAMM-Diffusion modality synthesis)",
        "synthetic": True,
        "target": task.target,
        "conditions": task.conditions,
        "inputs": {k: str(Path(v).resolve()) for k, v in condition_files.items()},
        "model": model_fingerprint(model_path),
        "sampler": inferer.settings(),
        "steps": inferer.num_inference_steps,
        "seed": inferer.seed,
        "preprocessing": {"pixdim": task.pixdim, "axcodes": task.axcodes, "percentiles": [task.lower, task.upper]},
        "intensity_mapping": {**{k: float(v) for k, v in intensity.items()}, "source": source},
        "branch_statistics": predictor.summary(),
        "seconds": time.perf_counter() - t0,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **dict(extra_sidecar or {}),
    }
    atomic_write_json(sidecar, out_path.with_name(stem + ".json"))
    return out_path

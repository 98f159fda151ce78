"""One BraTS subject: checked, preprocessed for slice-wise inference, synthesised and written on its input grid."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from damm.tasks.brats_files import check_subject_files
from damm.tasks.brats_volume import predict_volume, to_input_grid
from ddcore.images import load_image, save_nifti_like
from transforms.intensity import NORM_META_KEY
from transforms.pipelines import brats_volume_pipeline

__all__ = ["PreparedSubject", "prepare_subject", "subject_pipeline", "synthesise_subject", "voxels", "write_nifti_like"]


def write_nifti_like(array: np.ndarray, reference: str | Path, path: str | Path) -> Path:
    """Write a volume on the reference file's grid as float32 NIfTI (affine, qform, sform and codes kept).

    Args:
        array: volume on the reference grid.
        reference: the input file.
        path: destination (``.nii.gz`` or ``.nii``).

    Returns:
        ``path``.

    Raises:
        ValueError: the shape differs from the reference.
    """
    return save_nifti_like(array, reference, path, dtype=np.float32)


def voxels(path: str | Path, name: str) -> np.ndarray:
    """A NIfTI file's voxels ``[X, Y, Z]`` (float32, the file's own voxel order), read with MONAI ``LoadImage``.

    Args:
        path: the file.
        name: what it is (for messages).

    Returns:
        The array.
    """
    return np.asarray(load_image(path, name).as_tensor()[0])


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
        reference_image: the reference file loaded (channel-first ``MetaTensor``; resampling target).
        input_brain: brain mask on the input grid (union of the conditions' non-zero voxels).
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
    reference_image: Any = None
    input_brain: np.ndarray | None = None


def subject_pipeline(
    keys: Sequence[str], pixdim: Any, axcodes: str | None, lower: float, upper: float, tol: float
) -> Any:
    """The task's volume pipeline (:func:`transforms.pipelines.brats_volume_pipeline`, cropped to the brain).

    Args:
        keys: modalities.
        pixdim: resampling spacing (mm) or ``None``.
        axcodes: orientation.
        lower: normalisation lower percentile.
        upper: normalisation upper percentile.
        tol: co-registration tolerance.

    Returns:
        The MONAI ``Compose``.
    """
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
    pipe = subject_pipeline(conditions, pixdim, axcodes, lower, upper, tolerance)
    cond_item = pipe({k: str(use[k]) for k in conditions})
    reference = load_image(use[conditions[0]], conditions[0])
    input_brain = np.asarray(reference.as_tensor()[0]) > 0
    for k in conditions[1:]:
        input_brain |= voxels(use[k], k) > 0
    prep = PreparedSubject(
        subject=subject,
        files=use,
        conditions={k: cond_item[k] for k in conditions},
        brain=cond_item["brain_mask"],
        reference=use[conditions[0]],
        grid=grid,
        reference_image=reference,
        input_brain=input_brain,
    )
    if has_target:
        keys = [*conditions, target]
        item = subject_pipeline(keys, pixdim, axcodes, lower, upper, tolerance)({k: str(use[k]) for k in keys})
        prep.target = item[target]
        prep.target_brain = item["brain_mask"]
        params = item[target].meta[NORM_META_KEY]
        prep.target_params = {"lower": float(params["lower"]), "upper": float(params["upper"])}
    return prep


def synthesise_subject(
    prep: PreparedSubject,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    intensity: Mapping[str, float],
    multiple: int = 16,
    use_target: bool = False,
) -> np.ndarray:
    """Whole-subject synthesis on the input grid (input intensity scale).

    Args:
        prep: the prepared subject.
        predictor: predictor callable (or the autoencoder ceiling when ``use_target``).
        intensity: ``{"lower", "upper"}`` mapping ``[-1, 1]`` back to the input scale.
        multiple: in-plane size multiple.
        use_target: feed the true target (autoencoder ceiling) instead of the conditions.

    Returns:
        ``[X0, Y0, Z0]`` float32 volume on the reference grid (zero outside the input brain).

    Raises:
        ValueError: ``use_target`` without a target image.
    """
    if use_target:
        if prep.target is None:
            raise ValueError(f"subject {prep.subject!r}: no target image for the autoencoder ceiling")
        vol, brain = predict_volume(predictor, [prep.target], prep.target_brain, multiple), prep.target_brain
    else:
        vol, brain = predict_volume(predictor, list(prep.conditions.values()), prep.brain, multiple), prep.brain
    return to_input_grid(vol, brain, intensity, prep.reference_image, prep.input_brain)

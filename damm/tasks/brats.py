"""Brain MRI modality synthesis (BraTS-style): the :class:`~damm.tasks.protocol.RealDataTask` for NIfTI subjects.

Protocol (our own design; the paper's BraTS protocol is unknown, damm.md §4.2):

- **Modalities.** Target and conditions come from the config (default: ``flair`` from ``t2`` (anchor, uni-modal
  branch), ``t1`` and ``t1c`` (auxiliary)). File naming schemes: :mod:`damm.tasks.brats_files`.
- **Preprocessing.** :func:`transforms.pipelines.brats_volume_pipeline`: orientation (``RAS``), optional
  resampling (``pixdim``, e.g. 2 mm for CPU runs), brain mask = union of non-zero voxels, crop to the brain, and
  per-modality brain-mask percentile normalisation to ``[-1, 1]``.
- **Training data.** Axial 2D slices whose brain fraction is at least ``min_brain_fraction``, padded (background
  ``-1``) to one in-plane size divisible by the autoencoder x denoiser downsampling.
- **Splits.** With several subjects the datalist's (or a seeded) *subject-level* split is used. With a single
  subject (or when ``split_mode="slices"``) a *slice-level* split is used instead: the slices whose centre lies in
  the fraction ``heldout_range`` of the brain's superior-inferior extent are held out (test, and validation for
  monitoring only); slices within ``gap_mm`` of that slab are used for nothing (neighbouring slices are nearly
  identical), the rest train. The same slab, in mm, selects the evaluated slices on the input grid
  (:mod:`damm.tasks.brats_volume`).
- **Inference.** Whole subject: every slice that holds brain is synthesised (batched), the slices are stacked
  back into the cropped volume, intensities mapped back to the input scale, the volume resampled onto the
  **input grid** (``ResampleToMatch``) and written as NIfTI on that grid (:func:`ddcore.images.save_nifti_like`).
- **Evaluation.** On the input grid, inside the brain (union of the source modalities) of the held-out slices
  (and within the tumour label when a ``seg`` exists): PSNR, SSIM, MAE after mapping both images to ``[0, 1]``
  with the target's normalisation range (:mod:`damm.tasks.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from damm.tasks.brats_data import BraTSTaskData
from damm.tasks.brats_files import check_subject_files, modality_filename, scheme_of, subject_files
from damm.tasks.brats_subject import PreparedSubject, prepare_subject, synthesise_subject, write_nifti_like
from damm.tasks.brats_volume import heldout_slab, predict_volume, size_multiple, to_input_grid
from damm.tasks.common import format_results_table
from damm.tasks.protocol import TaskInference, evaluate
from damm.tasks.protocol import synthesise_to_file as synthesise_unit_to_file

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
    "synthesise_to_file",
    "to_input_grid",
    "write_nifti_like",
]


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
    """Whole-subject evaluation of every method on the held-out data (:func:`damm.tasks.protocol.evaluate`).

    Args:
        model: :class:`damm.model.DAMMModel`.
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
    return evaluate(
        task, model, inferer, output_dir, model_path, branches, extra_predictors, ssim_win_size, write_volumes, load
    )


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
    predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    method: str = "damm",
) -> Path:
    """Synthesise one subject's target and write it (NIfTI on the input grid) plus a JSON sidecar.

    Args:
        model: the loaded model (``None`` with another method's ``predictor``).
        inferer: the sampler (``None`` with another method's ``predictor``).
        condition_files: ``{condition: path}``.
        out_path: NIfTI destination (the sidecar is ``<stem>.json`` beside it).
        task: task settings (target, conditions, pixdim, orientation, percentiles).
        subject: subject id.
        intensity_reference: ``{"lower", "upper"}`` or the JSON written at training; used unless ``true_target``.
        true_target: the real target file, if any (its intensity range is then used).
        model_path: checkpoint recorded in the sidecar (the method's model file).
        extra_sidecar: more sidecar fields.
        predictor: another method's predictor (UNet, trivial baseline) instead of DAMM.
        method: the method's name, recorded in the sidecar.

    Returns:
        ``out_path``.

    Raises:
        ValueError: no way to map intensities back.
    """
    return synthesise_unit_to_file(
        task,
        model,
        inferer,
        condition_files,
        out_path,
        name=subject,
        intensity_reference=intensity_reference,
        true_target=true_target,
        model_path=model_path,
        extra_sidecar=extra_sidecar,
        predictor=predictor,
        method=method,
    )


class SubjectInference(TaskInference):
    """Whole-subject inference for the bundle's ``inference`` run id (the ``evaluator`` of the task overlay).

    For every subject (the task's subjects, or the subject folders in ``input_dirs``) the target is synthesised
    from the conditions and written as ``<output_dir>/<subject>/<scheme file name of the target>`` with a JSON
    sidecar; everything is checked first (:meth:`damm.tasks.protocol.TaskInference.run`).

    Args:
        model: the loaded :class:`damm.model.DAMMModel`.
        inferer: the sampler.
        output_dir: output folder.
        task: the task data (its settings and subjects).
        input_dirs: subject folders to process instead of the task's subjects.
        intensity_reference: JSON written at training (``models/target_intensity.json``).
        model_path: checkpoint path recorded in the sidecar.
        overwrite: replace existing outputs.
        predictor: another method's predictor (UNet, trivial baseline) instead of DAMM.
        method: the method's name, recorded in the sidecars.
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
        predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
        method: str = "damm",
    ) -> None:
        super().__init__(
            model, inferer, output_dir, task, intensity_reference, model_path, overwrite, predictor, method
        )
        self.input_dirs = [Path(p) for p in input_dirs] if input_dirs else None

    def jobs(self) -> list[tuple[str, dict[str, Path], Path, dict[str, Any]]]:
        """Subjects with their output path under their naming scheme.

        Returns:
            ``[(subject, files, output path, {})]``.
        """
        found = []
        if self.input_dirs:
            for d in self.input_dirs:
                info = subject_files(d)
                found.append((info["subject"], info["files"], info["scheme"], info["file_prefix"]))
        else:
            for name, info in self.task.subjects().items():
                found.append((name, info["files"], *scheme_of(info["files"][self.task.conditions[0]])))
        target = self.task.target
        return [
            (name, dict(files), self.output_dir / name / modality_filename(scheme, target, prefix), {})
            for name, files, scheme, prefix in found
        ]

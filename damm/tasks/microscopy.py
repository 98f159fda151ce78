"""Fluorescence channel prediction on real microscopy fields: tiled training, whole-field sliding-window inference.

Protocol (our own design; the task's data side is :class:`damm.tasks.microscopy_data.MicroscopyTaskData`, a
:class:`~damm.tasks.protocol.RealDataTask`):

- **Fields and channels.** Fields stored one file per channel, grouped by
  :func:`damm.tasks.microscopy_files.find_fields` (e.g. ``fly/POS002_dapi.tif``; or one folder per field:
  ``human/dna.tif``). Defaults: ``rhodamine`` from ``fitc`` (anchor) and ``dapi`` for the fly data; ``ph3`` from
  ``dna`` and ``cellbody`` for the human data.
- **Normalisation.** Per field and channel, the ``[lower, upper]`` percentiles of the whole field map to
  ``[-1, 1]`` (clipped), so tiles of one field share one intensity scale and whole-field inference sees the same
  scale as training.
- **Splits.** With few fields (``split_mode="auto"`` and fewer than 3 fields, or ``"region"``) each field is split
  spatially: its right-most ``heldout_fraction`` of columns is held out (test, and validation for monitoring
  only); a ``gap`` of columns before it is used for nothing; training tiles (``tile_size``, ``stride``) come from
  the rest. With more fields, a field-level split (``"fields"``) is used.
- **Inference.** Whole fields by overlapping windows with Gaussian blending (MONAI ``SlidingWindowInferer``; each
  window batch is one call of the diffusion sampler, with its own seed), mapped back to the input intensity scale
  (:func:`damm.outputs.to_input_scale`) and written as TIFF of the input size and dtype (clipped to the dtype's
  range).
- **Evaluation.** PSNR, SSIM and MAE in ``[0, 1]`` (target's percentile range) over the held-out region.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from damm.outputs import to_input_scale
from damm.tasks.microscopy_data import MicroscopyTaskData, PreparedField, load_field, predict_field
from damm.tasks.microscopy_files import read_channel
from damm.tasks.protocol import TaskInference, evaluate, synthesise_to_file

__all__ = [
    "FieldInference",
    "MicroscopyTaskData",
    "PreparedField",
    "evaluate_task",
    "load_field",
    "predict_field",
    "read_channel",
    "synthesise_field_to_file",
    "to_input_scale",
]


def evaluate_task(
    model: Any,
    inferer: Any,
    task: MicroscopyTaskData,
    output_dir: str | Path,
    model_path: str | Path | None = None,
    branches: Sequence[str] = ("damm", "uni", "multi"),
    extra_predictors: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 16,
    ssim_win_size: int = 7,
    write_images: bool = True,
    load: bool = True,
) -> dict[str, Any]:
    """Sliding-window evaluation of every method on the held-out part of each field (or the test fields).

    Only the held-out columns plus half a tile of context are synthesised (the rest was seen in training); see
    :func:`damm.tasks.protocol.evaluate`.

    Args:
        model: :class:`damm.model.DAMMModel`.
        inferer: the sampler.
        task: the task data.
        output_dir: output folder (``task_evaluation.json`` / ``.md`` and TIFF predictions).
        model_path: checkpoint to load first (when ``load``) and to record.
        branches: DAMM branches.
        extra_predictors: other methods (e.g. the UNet baseline).
        overlap: window overlap.
        sw_batch_size: windows per sampler call.
        ssim_win_size: SSIM window.
        write_images: write each method's prediction as TIFF (input dtype).
        load: load ``model_path`` first.

    Returns:
        The results dict.
    """
    return evaluate(
        task,
        model,
        inferer,
        output_dir,
        model_path,
        branches,
        extra_predictors,
        ssim_win_size,
        write_images,
        load,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
    )


def synthesise_field_to_file(
    model: Any,
    inferer: Any,
    condition_files: Mapping[str, str | Path],
    out_path: str | Path,
    task: MicroscopyTaskData,
    intensity_reference: str | Path | Mapping[str, float] | None = None,
    true_target: str | Path | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 16,
    model_path: str | Path | None = None,
    overwrite: bool = False,
    predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    method: str = "damm",
) -> Path:
    """Whole-field synthesis written as TIFF of the input size and dtype, with a JSON sidecar.

    Args:
        model: the loaded model (``None`` with another method's ``predictor``).
        inferer: the sampler (``None`` with another method's ``predictor``).
        condition_files: ``{condition: path}``.
        out_path: TIFF destination (the sidecar is ``<stem>.json``).
        task: task settings.
        intensity_reference: ``{"lower", "upper"}`` or the JSON written at training (used unless ``true_target``).
        true_target: the real target file (its intensity range is then used).
        overlap: window overlap.
        sw_batch_size: windows per sampler call.
        model_path: recorded in the sidecar.
        overwrite: replace an existing output.
        predictor: another method's predictor (UNet, trivial baseline) instead of DAMM.
        method: the method's name, recorded in the sidecar.

    Returns:
        ``out_path``.

    Raises:
        FileExistsError: the output exists and ``overwrite`` is false.
        ValueError: bad inputs (missing channel, channels of different sizes) or no intensity reference.
    """
    return synthesise_to_file(
        task,
        model,
        inferer,
        condition_files,
        out_path,
        name=Path(out_path).stem,
        intensity_reference=intensity_reference,
        true_target=true_target,
        model_path=model_path,
        overwrite=overwrite,
        predictor=predictor,
        method=method,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
    )


class FieldInference(TaskInference):
    """Whole-field inference for the bundle's ``inference`` run id (the ``evaluator`` of the task overlay).

    Args:
        model: the loaded model.
        inferer: the sampler.
        output_dir: output folder (``<field>_<target>.tif`` + sidecar per field).
        task: the task data (its fields are processed).
        intensity_reference: training reference JSON (used for fields without the real target).
        model_path: recorded in the sidecars.
        overlap: window overlap.
        sw_batch_size: windows per sampler call.
        overwrite: replace existing outputs.
        predictor: another method's predictor (UNet, trivial baseline) instead of DAMM.
        method: the method's name, recorded in the sidecars.
    """

    def __init__(
        self,
        model: Any,
        inferer: Any,
        output_dir: str | Path,
        task: MicroscopyTaskData,
        intensity_reference: str | Path | None = None,
        model_path: str | Path | None = None,
        overlap: float = 0.25,
        sw_batch_size: int = 16,
        overwrite: bool = False,
        predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
        method: str = "damm",
    ) -> None:
        super().__init__(
            model,
            inferer,
            output_dir,
            task,
            intensity_reference,
            model_path,
            overwrite,
            predictor,
            method,
            overlap=overlap,
            sw_batch_size=sw_batch_size,
        )
        self.overlap, self.sw_batch_size = overlap, sw_batch_size

    def jobs(self) -> list[tuple[str, dict[str, Path], Path, dict[str, Any]]]:
        """Every field holding the condition channels (the target is optional), written as ``<field>_<target>.tif``
        (``/`` in field ids becomes ``_``).

        Returns:
            ``[(field, files, output path, {})]``.
        """
        return [
            (name, dict(info["files"]), self.output_dir / f"{name.replace('/', '_')}_{self.task.target}.tif", {})
            for name, info in self.task.inference_fields().items()
        ]

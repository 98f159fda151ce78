"""The task protocol: the steps every real-data task has, and the code that runs them for any task.

A real-data task (:class:`damm.tasks.brats.BraTSTaskData`, :class:`damm.tasks.microscopy.MicroscopyTaskData`)
implements :class:`RealDataTask`:

1. **Data preparation**: discover the units (subjects / fields) holding every configured modality
   (:meth:`~RealDataTask.units`), check their files before any work (:meth:`~RealDataTask.check`), split them
   (:meth:`~RealDataTask.resolved_split_mode`) and cut the in-memory training items
   (:meth:`~RealDataTask.prepare_items`, served by :meth:`~RealDataTask.items`).
2. **Prediction**: read and normalise one whole unit (:meth:`~RealDataTask.prepare`) and predict its target with
   a predictor, back on the input grid and intensity scale (:meth:`~RealDataTask.predict`).
3. **Writing**: write a prediction in the input's format and geometry (:meth:`~RealDataTask.write`); the sidecar
   is written here (:func:`synthesise_to_file`) with the task's settings (:meth:`~RealDataTask.sidecar_settings`).
4. **Evaluation**: the held-out cases with their truth and regions (:meth:`~RealDataTask.evaluation_cases`),
   compared for every method by :func:`evaluate`.

:class:`TaskInference` is the bundle's ``inference`` runner for any task: every output is checked before the first
synthesis, then every unit is synthesised with :func:`synthesise_to_file`.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from damm.outputs import output_stem
from damm.tasks.common import (
    AutoencoderCeiling,
    DAMMPredictor,
    evaluation_methods,
    model_fingerprint,
    pop_branch_statistics,
    read_intensity_reference,
    write_task_evaluation,
)
from damm.tasks.metrics import region_metrics, to_unit
from ddcore.atomic import atomic_write_json

__all__ = ["EvaluationCase", "RealDataTask", "TaskInference", "evaluate", "resolve_intensity", "synthesise_to_file"]

logger = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]
SPLITS = ("training", "validation", "test")


@dataclass
class EvaluationCase:
    """One evaluated unit (subject or field) as :func:`evaluate` needs it.

    Attributes:
        name: unit id.
        files: ``{modality: path}`` of the unit.
        prepared: what :meth:`RealDataTask.prepare` returned (possibly restricted, e.g. cropped).
        truth: the true target mapped to ``[0, 1]`` with ``intensity``.
        regions: ``{region name: boolean mask or None}`` on the truth's grid.
        intensity: ``{"lower", "upper"}`` of the target (metric space and mapping back).
        output: output path relative to the evaluation folder, with a ``{method}`` field.
        axis: SSIM slice axis (``None``: 2D images).
        record: more fields of the unit's result record.
    """

    name: str
    files: dict[str, Path]
    prepared: Any
    truth: Any
    regions: dict[str, Any]
    intensity: dict[str, float]
    output: str
    axis: int | None = None
    record: dict[str, Any] = field(default_factory=dict)


class RealDataTask(ABC):
    """The steps of a real-data task (see the module docstring). Subclasses set ``target``, ``conditions``,
    ``reference_path`` (where the target's training intensity range is written) and ``tolerance``."""

    #: ``"brats"`` / ``"microscopy"`` (the results' ``task``).
    task_name: ClassVar[str] = "task"
    #: the sidecars' ``generated_by``.
    generated_by: ClassVar[str] = "damm.tasks"
    #: what a unit is, for messages (``"subject"``, ``"field"``).
    unit: ClassVar[str] = "unit"

    target: str
    conditions: list[str]
    _items: dict[str, list[dict[str, Any]]] | None = None

    @property
    def modalities(self) -> list[str]:
        """Target first, then the conditions."""
        return [self.target, *self.conditions]

    # ------------------------------------------------------------------ 1. data preparation
    @abstractmethod
    def units(self) -> dict[str, dict[str, Any]]:
        """Units holding every configured modality: ``{name: {"files": {modality: Path}, "split": str | None}}``."""

    @abstractmethod
    def resolved_split_mode(self) -> str:
        """The split in use (``"auto"`` resolved)."""

    @abstractmethod
    def check(self) -> dict[str, int]:
        """Check every unit's files before training; return the number of units per split."""

    @abstractmethod
    def prepare_items(self) -> dict[str, list[dict[str, Any]]]:
        """Cut the in-memory training items of every split (``{"training": [...], "validation": [...], ...}``)."""

    def items(self, split: str) -> list[dict[str, Any]]:
        """In-memory items of a split (prepared once, on first use).

        Args:
            split: ``"training"``, ``"validation"`` or ``"test"``.

        Returns:
            The items.

        Raises:
            ValueError: unknown or empty split.
        """
        if self._items is None:
            self._items = self.prepare_items()
        if split not in self._items:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self._items)}")
        if not self._items[split]:
            raise ValueError(f"{self.task_name} task: split {split!r} has no item")
        return self._items[split]

    # ------------------------------------------------------------------ 2. prediction
    @abstractmethod
    def check_inputs(self, name: str, files: Mapping[str, Path]) -> None:
        """Check (cheaply, before any synthesis) that a unit has readable, consistent condition files."""

    @abstractmethod
    def prepare(self, files: Mapping[str, str | Path], name: str) -> Any:
        """Read and normalise one whole unit: its conditions and, when ``files`` holds it, its target."""

    @abstractmethod
    def target_intensity(self, prepared: Any) -> dict[str, float] | None:
        """The prepared unit's own target range ``{"lower", "upper"}`` (``None`` when it has no target)."""

    @abstractmethod
    def predict(
        self, prepared: Any, predictor: Predictor, intensity: Mapping[str, float], use_target: bool = False, **options
    ) -> np.ndarray:
        """Predict the whole unit's target, on the input grid and intensity scale.

        ``use_target`` feeds the true target instead of the conditions (the autoencoder ceiling).
        """

    # ------------------------------------------------------------------ 3. writing
    @abstractmethod
    def write(self, array: np.ndarray, prepared: Any, path: str | Path) -> Path:
        """Write a prediction in the input's format and geometry."""

    def sidecar_settings(self, **options) -> dict[str, Any]:
        """Task settings recorded in every sidecar."""
        return {}

    # ------------------------------------------------------------------ 4. evaluation
    @abstractmethod
    def evaluation_cases(self) -> Iterator[EvaluationCase]:
        """The held-out cases, one at a time."""

    def evaluation_settings(self, **options) -> dict[str, Any]:
        """Task settings recorded in the evaluation results."""
        return {"split_mode": self.resolved_split_mode()}

    def metric_space(self, ssim_win_size: int) -> str:
        """How the metrics are computed (for the results)."""
        return f"both images mapped to [0, 1] with the target's range; PSNR max 1; SSIM window {ssim_win_size}"

    def ceiling_batch_size(self, inferer: Any, **options) -> int:
        """Images per forward pass of the autoencoder ceiling."""
        return int(inferer.batch_size or 32)


def resolve_intensity(
    task: RealDataTask, prepared: Any, intensity_reference: str | Path | Mapping[str, float] | None
) -> tuple[dict[str, float], str]:
    """How a prediction maps back to the input scale: the unit's own target range when it has its target, else the
    given range or the training reference.

    Args:
        task: the task.
        prepared: the prepared unit.
        intensity_reference: ``{"lower", "upper"}``, the JSON written at training, or ``None``.

    Returns:
        ``({"lower", "upper"}, source description)``.

    Raises:
        ValueError: no way to map intensities back.
    """
    own = task.target_intensity(prepared)
    if own is not None:
        return dict(own), f"the {task.unit}'s real {task.target}"
    if isinstance(intensity_reference, Mapping):
        return {k: float(v) for k, v in intensity_reference.items()}, "given"
    if intensity_reference is not None:
        return read_intensity_reference(intensity_reference, task.target), str(intensity_reference)
    raise ValueError("no intensity reference: give the training reference JSON (models/target_intensity.json)")


def synthesise_to_file(
    task: RealDataTask,
    model: Any,
    inferer: Any,
    condition_files: Mapping[str, str | Path],
    out_path: str | Path,
    name: str = "unit",
    intensity_reference: str | Path | Mapping[str, float] | None = None,
    true_target: str | Path | None = None,
    model_path: str | Path | None = None,
    extra_sidecar: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    predictor: Predictor | None = None,
    method: str = "damm",
    **options: Any,
) -> Path:
    """Synthesise one unit's target, write it in the input's format and geometry, and a JSON sidecar beside it.

    Any method writes the same output and sidecar: DAMM (the default, ``predictor=None``: the model sampled with
    ``inferer``) or any other predictor (the UNet baseline, a trivial baseline); for those the sampler fields of
    the sidecar (``sampler``, ``steps``, ``seed``, ``branch_statistics``) are ``null``. The output is clamped to
    the intensity range the sidecar states (``intensity_mapping.clamped_to``; outside the brain 0 for BraTS).

    Args:
        task: the task.
        model: the loaded model (DAMM; unused when ``predictor`` is given).
        inferer: the sampler (DAMM; unused when ``predictor`` is given).
        condition_files: ``{condition: path}``.
        out_path: destination (the sidecar is ``<stem>.json`` beside it).
        name: unit id.
        intensity_reference: see :func:`resolve_intensity` (used unless ``true_target``).
        true_target: the real target file, if any (its intensity range is then used; it is never overwritten).
        model_path: checkpoint recorded in the sidecar.
        extra_sidecar: more sidecar fields.
        overwrite: replace an existing output.
        predictor: another method's predictor (``[B, n_cond, H, W] -> [B, 1, H, W]``), instead of DAMM.
        method: the method's name, recorded in the sidecar (``"damm"``, ``"unet"``, ``"copy_t2_linear"``...).
        options: the task's prediction options (e.g. sliding-window ``overlap``).

    Returns:
        ``out_path``.

    Raises:
        FileExistsError: the output exists and ``overwrite`` is false.
        ValueError: bad inputs or no intensity reference.
    """
    if predictor is None and (model is None or inferer is None):
        raise ValueError(f"synthesise_to_file: method {method!r} needs a model and an inferer, or a predictor")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"output {out_path} exists; pass overwrite=True to replace it")
    t0 = time.perf_counter()
    files = dict(condition_files)
    if true_target is not None:
        files[task.target] = true_target
    prepared = task.prepare(files, name)
    intensity, source = resolve_intensity(task, prepared, intensity_reference)
    sampled = predictor is None or isinstance(predictor, DAMMPredictor)
    if predictor is None:
        predictor = DAMMPredictor(model, inferer)
    sampler = predictor.inferer if isinstance(predictor, DAMMPredictor) else None
    task.write(task.predict(prepared, predictor, intensity, **options), prepared, out_path)
    lo, hi = float(intensity["lower"]), float(intensity["upper"])
    sidecar = {
        "generated_by": task.generated_by,
        "synthetic": True,
        "method": method,
        "target": task.target,
        "conditions": task.conditions,
        "inputs": {k: str(Path(v).resolve()) for k, v in condition_files.items()},
        "model": model_fingerprint(model_path),
        "sampler": sampler.settings() if sampled else None,
        "steps": sampler.num_inference_steps if sampled else None,
        "seed": sampler.seed if sampled else None,
        **task.sidecar_settings(**options),
        "intensity_mapping": {
            **{k: float(v) for k, v in intensity.items()},
            "source": source,
            "clamped_to": [lo, hi],
        },
        "branch_statistics": predictor.summary() if sampled else None,
        "seconds": time.perf_counter() - t0,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **dict(extra_sidecar or {}),
    }
    atomic_write_json(sidecar, out_path.with_name(output_stem(out_path) + ".json"))
    return out_path


def evaluate(
    task: RealDataTask,
    model: Any,
    inferer: Any,
    output_dir: str | Path,
    model_path: str | Path | None = None,
    branches: Sequence[str] = ("damm", "uni", "multi"),
    extra_predictors: Mapping[str, Predictor] | None = None,
    ssim_win_size: int = 7,
    write_outputs: bool = True,
    load: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate every method on the task's held-out cases (the ``training`` run id's last step).

    Methods: the target autoencoder's reconstruction of the true target (ceiling), the gated DAMM prediction and
    each branch alone (same sampler settings), plus any ``extra_predictors`` (e.g. the UNet baseline). Metrics per
    region in ``[0, 1]``; ``task_evaluation.json`` and ``.md`` written atomically.

    Args:
        task: the task.
        model: :class:`damm.model.DAMMModel`.
        inferer: :class:`damm.inferers.DAMMInferer`.
        output_dir: output folder (results and, with ``write_outputs``, each method's prediction).
        model_path: checkpoint to load first (when ``load``) and to record.
        branches: DAMM branches to evaluate.
        extra_predictors: other methods ``{name: predictor}``.
        ssim_win_size: SSIM window.
        write_outputs: write each method's prediction (``EvaluationCase.output``).
        load: load ``model_path`` into ``model`` first (the trained weights of the ``training`` run).
        options: the task's prediction options.

    Returns:
        The results dict.
    """
    from damm.model import load_model

    if load and model_path is not None:
        load_model(model, model_path)
    model.eval()
    output_dir = Path(output_dir)
    results: dict[str, Any] = {
        "task": task.task_name,
        "target": task.target,
        "conditions": task.conditions,
        **task.evaluation_settings(**options),
        "sampler": inferer.settings(),
        "model": model_fingerprint(model_path),
        "metric_space": task.metric_space(ssim_win_size),
        "subjects": {},
    }
    methods = evaluation_methods(model, inferer, branches, extra_predictors)
    ceiling = AutoencoderCeiling(
        model.autoencoders[task.target], task.ceiling_batch_size(inferer, **options), inferer.precision
    )
    for case in task.evaluation_cases():
        subj: dict[str, Any] = {"files": {k: str(v) for k, v in case.files.items()}, **case.record, "methods": {}}
        for method, predictor in methods.items():
            t0 = time.perf_counter()
            use_target = predictor is None  # the autoencoder ceiling
            pred = task.predict(
                case.prepared, ceiling if use_target else predictor, case.intensity, use_target=use_target, **options
            )
            rec: dict[str, Any] = {"seconds": time.perf_counter() - t0}
            lo, hi = case.intensity["lower"], case.intensity["upper"]
            pred_u = to_unit(np.asarray(pred, dtype=np.float32), lo, hi)
            rec.update(region_metrics(pred_u, case.truth, case.regions, win_size=ssim_win_size, axis=case.axis))
            pop_branch_statistics(predictor, rec)
            subj["methods"][method] = rec
            if write_outputs:
                task.write(pred, case.prepared, output_dir / case.output.format(method=method))
            first = next(iter(case.regions))
            logger.info(f"{case.name} {method}: {first} {rec.get(first)} ({rec['seconds']:.1f} s)")
        results["subjects"][case.name] = subj
    return write_task_evaluation(results, output_dir)


class TaskInference:
    """Whole-unit inference for the bundle's ``inference`` run id (the ``evaluator`` of a task overlay).

    Every output path is checked (and every unit's condition files, :meth:`RealDataTask.check_inputs`) before the
    first synthesis; then each unit is synthesised with :func:`synthesise_to_file`. When a unit has its true
    target, it is only used to map intensities back (and never overwritten).

    Args:
        model: the loaded :class:`damm.model.DAMMModel`.
        inferer: the sampler.
        output_dir: output folder.
        task: the task (its settings and units).
        intensity_reference: JSON written at training (``models/target_intensity.json``).
        model_path: checkpoint path recorded in the sidecars.
        overwrite: replace existing outputs.
        predictor: another method's predictor instead of DAMM (``model`` and ``inferer`` may then be ``None``).
        method: the method's name for the sidecars.
        options: the task's prediction options.
    """

    def __init__(
        self,
        model: Any,
        inferer: Any,
        output_dir: str | Path,
        task: RealDataTask,
        intensity_reference: str | Path | None = None,
        model_path: str | Path | None = None,
        overwrite: bool = False,
        predictor: Predictor | None = None,
        method: str = "damm",
        **options: Any,
    ) -> None:
        self.model, self.inferer, self.task = model, inferer, task
        self.output_dir = Path(output_dir)
        self.intensity_reference = intensity_reference
        self.model_path = model_path
        self.overwrite = overwrite
        self.predictor, self.method = predictor, method
        self.options = options

    def jobs(self) -> list[tuple[str, dict[str, Path], Path, dict[str, Any]]]:
        """The units to synthesise (each task's runner says where its outputs go).

        Returns:
            ``[(unit, files, output path, extra sidecar fields)]``.
        """
        raise NotImplementedError(f"{type(self).__name__} must define jobs()")

    def run(self) -> list[Path]:
        """Synthesise every unit.

        Returns:
            The written paths.

        Raises:
            FileExistsError: an output exists and ``overwrite`` is false (nothing is computed).
            ValueError: a unit lacks a condition or its files are inconsistent (nothing is computed).
        """
        jobs = self.jobs()
        for name, files, out, _ in jobs:  # check everything before the first synthesis
            if out.exists() and not self.overwrite:
                raise FileExistsError(f"output {out} exists; set overwrite to replace it")
            missing = [k for k in self.task.conditions if k not in files]
            if missing:
                unit = f"{self.task.unit} {name!r}"
                raise ValueError(f"{unit}: missing source modalities {missing} (found {sorted(files)})")
            self.task.check_inputs(name, {k: files[k] for k in self.task.conditions})
        return [
            synthesise_to_file(
                self.task,
                self.model,
                self.inferer,
                {k: files[k] for k in self.task.conditions},
                out,
                name=name,
                intensity_reference=self.intensity_reference,
                true_target=files.get(self.task.target),
                model_path=self.model_path,
                extra_sidecar=extra,
                overwrite=self.overwrite,
                predictor=self.predictor,
                method=self.method,
                **self.options,
            )
            for name, files, out, extra in jobs
        ]

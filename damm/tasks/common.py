"""Pieces shared by the real-data tasks: predictors, a wall-clock training budget, intensity references.

- :class:`DAMMPredictor` / :class:`AutoencoderCeiling`: the callables the whole-volume (BraTS) and whole-field
  (microscopy) inference code calls on a batch of stacked condition images ``[B, n_cond, H, W]`` in ``[-1, 1]``;
  the UNet baseline (:mod:`damm.tasks.baseline`) has the same interface.
- :class:`TimeBudget`: ignite handler that ends a training run after a wall-clock budget (config entries
  ``ae_time_budget_s`` / ``dm_time_budget_s`` of the task overlays), so models can be compared at equal cost.
- :func:`write_intensity_reference` / :func:`read_intensity_reference`: the target modality's typical intensity
  range, measured on the training data, used to map a prediction back to the input scale when the true target is
  absent (the missing-modality case).
- :class:`ItemsToTensord`: the "preprocessing" of in-memory slice/tile items (they are already normalised).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform

from damm.inferers import GATE_DECISIONS
from ddcore.atomic import atomic_write_json, atomic_write_text
from ddcore.precision import autocast, autocast_dtype, check_precision

__all__ = [
    "AutoencoderCeiling",
    "DAMMPredictor",
    "ItemsToTensord",
    "TimeBudget",
    "evaluation_branch",
    "evaluation_methods",
    "format_results_table",
    "mean_over_subjects",
    "model_fingerprint",
    "pop_branch_statistics",
    "read_intensity_reference",
    "write_intensity_reference",
    "write_task_evaluation",
]

logger = logging.getLogger(__name__)


class ItemsToTensord(MapTransform):
    """Turn the images of an in-memory item into float32 ``torch.Tensor`` copies (no resampling, no scaling).

    Args:
        keys: image keys.
        allow_missing_keys: skip keys absent from the item (e.g. the target at inference).
    """

    def __init__(self, keys: Sequence[str], allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert the keys.

        Args:
            data: item dict.

        Returns:
            A new dict.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
            d[key] = x.float().clone()
        return d


class TimeBudget:
    """Stop an ignite engine once ``seconds`` of wall-clock time have passed since its start.

    The check runs after every iteration; the engine then ends normally (``COMPLETED`` fires), so the stage's
    export still runs. ``None`` or ``<= 0`` disables the budget.

    Args:
        seconds: the budget.
        name: for the log message.
    """

    def __init__(self, seconds: float | None, name: str = "training") -> None:
        self.seconds = None if seconds is None or float(seconds) <= 0 else float(seconds)
        self.name = name
        self._start = 0.0
        self.stopped_at_iteration: int | None = None

    def attach(self, engine: Engine) -> None:
        """Register with ``engine`` (called by MONAI trainers for every train handler).

        Args:
            engine: the trainer.
        """
        if self.seconds is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def _check(self, engine: Engine) -> None:
        if time.perf_counter() - self._start >= self.seconds:
            self.stopped_at_iteration = int(engine.state.iteration)
            logger.info(
                f"{self.name}: time budget of {self.seconds:.0f} s reached at iteration {engine.state.iteration}"
            )
            engine.terminate()


class DAMMPredictor:
    """Callable ``[B, n_cond, H, W] -> [B, C, H, W]`` running a :class:`damm.inferers.DAMMInferer`.

    Every call uses the inferer's seed plus the number of previous calls, so the windows of a sliding-window run
    get different (but reproducible) noise. The branch statistics of every call are kept for the sidecar.

    Args:
        model: :class:`damm.model.DAMMModel`.
        inferer: the sampler (its branch / steps / K / seed are used).
    """

    def __init__(self, model: Any, inferer: Any) -> None:
        self.model = model
        self.inferer = inferer
        self.calls = 0
        self.statistics: list[dict[str, Any]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sample the target for a batch of stacked condition images.

        Args:
            x: ``[B, n_cond, H, W]`` in ``[-1, 1]`` (anchor first).

        Returns:
            The prediction ``[B, C, H, W]`` (mean of the K samples), on ``x``'s device.
        """
        inf = self.inferer
        if inf.seed is not None and self.calls:
            inf = inf.replace(seed=int(inf.seed) + self.calls)
        self.calls += 1
        out = inf.sample(x, self.model)
        self.statistics.extend(out.statistics())
        return out.prediction.to(x.device)

    def summary(self) -> dict[str, Any]:
        """Branch statistics over every input seen so far.

        Returns:
            ``{"inputs", "multi_step_fraction", "gated_multi_fraction", "multi_sample_fraction", "confidence_mean"}``
            (means).
        """
        out: dict[str, Any] = {"inputs": len(self.statistics)}
        for key in ("multi_step_fraction", "gated_multi_fraction", "multi_sample_fraction", "confidence_mean"):
            vals = [s[key] for s in self.statistics if key in s]
            if vals:
                out[key] = float(np.mean(vals))
        return out


class AutoencoderCeiling:
    """Callable returning the target autoencoder's reconstruction of the *true* target (the upper bound).

    It ignores the conditions it is given and reconstructs ``target`` images set with :meth:`set_target`
    (stacked in the same order), so it runs through the same whole-volume / whole-field machinery.

    Args:
        autoencoder: the target's ``LatentAutoencoder``.
        batch_size: images per forward pass.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only): autocast dtype of encode/decode
            (use the sampler's, so the ceiling is measured as the synthesis decodes).

    Raises:
        ValueError: an unknown ``precision`` (here) or one the autoencoder's device cannot run (when called).
    """

    def __init__(self, autoencoder: torch.nn.Module, batch_size: int = 32, precision: str = "fp32") -> None:
        self.autoencoder = autoencoder
        self.batch_size = int(batch_size)
        autocast_dtype(precision)  # the name now; the device when called
        self.precision = precision

    @torch.no_grad()
    def __call__(self, target: torch.Tensor) -> torch.Tensor:
        """Reconstruct target images.

        Args:
            target: ``[B, 1, H, W]`` true target in ``[-1, 1]``.

        Returns:
            ``decode(encode(target))``, same shape and device.
        """
        ae = self.autoencoder
        device = next(ae.parameters()).device
        check_precision(self.precision, device, setting="precision")
        was = ae.training
        ae.eval()
        try:
            outs = []
            for s in range(0, target.shape[0], self.batch_size):
                with autocast(self.precision, device):
                    recon = ae.decode(ae.encode(target[s : s + self.batch_size].to(device).float()))
                outs.append(recon.float())
        finally:
            ae.train(was)
        return torch.cat(outs).to(target.device)


def write_intensity_reference(path: str | Path, modality: str, params: Sequence[Mapping[str, Any]]) -> Path:
    """Store the mean normalisation range of ``modality`` over training volumes / fields.

    Args:
        path: JSON file.
        modality: the target modality.
        params: the normalisation parameters (``lower``/``upper``) of each training volume or field.

    Returns:
        ``path``.

    Raises:
        ValueError: no parameters.
    """
    if not params:
        raise ValueError(f"write_intensity_reference: no normalisation parameters for {modality!r}")
    rec = {
        "modality": modality,
        "lower": float(np.mean([float(p["lower"]) for p in params])),
        "upper": float(np.mean([float(p["upper"]) for p in params])),
        "n": len(params),
        "description": "mean robust intensity range of the target over the training data; maps predictions back to "
        "the input scale when the true target is absent",
    }
    return atomic_write_json(rec, path)


def read_intensity_reference(path: str | Path, modality: str) -> dict[str, float]:
    """Read a reference written by :func:`write_intensity_reference`.

    Args:
        path: JSON file.
        modality: expected modality.

    Returns:
        ``{"lower", "upper"}``.

    Raises:
        FileNotFoundError: the file is missing (train the task first, or give the range explicitly).
        ValueError: the file is for another modality or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"intensity reference '{path}' not found: it is written when the task's training data is prepared; "
            "train first or pass the output intensity range explicitly"
        )
    rec = json.loads(path.read_text())
    if rec.get("modality") != modality:
        raise ValueError(f"intensity reference {path} is for {rec.get('modality')!r}, not {modality!r}")
    if not float(rec["upper"]) > float(rec["lower"]):
        raise ValueError(f"intensity reference {path}: upper must exceed lower, got {rec}")
    return {"lower": float(rec["lower"]), "upper": float(rec["upper"])}


def model_fingerprint(path: str | Path | None) -> dict[str, Any]:
    """Identify a checkpoint for sidecars and reports: its resolved path and SHA-256.

    Args:
        path: checkpoint file (may be ``None`` or missing).

    Returns:
        ``{"checkpoint", "sha256"}``, or only ``{"checkpoint"}`` when the file does not exist.
    """
    if path is None or not Path(path).is_file():
        return {"checkpoint": None if path is None else str(path)}
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"checkpoint": str(Path(path).resolve()), "sha256": digest}


def evaluation_methods(
    model: Any, inferer: Any, branches: Sequence[str], extra_predictors: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The methods a task evaluation compares: the autoencoder ceiling (``None``), one predictor per DAMM branch
    (single sample each) and any extra predictors (e.g. the UNet baseline).

    Args:
        model: the loaded :class:`damm.model.DAMMModel`.
        inferer: the sampler; copied per branch.
        branches: DAMM branches to evaluate: ``damm``, ``uni``, ``multi``; ``damm_<decision>`` for the gated
            prediction with another gating decision than the inferer's (``damm_blend``, ``damm_per_sample``,
            ``damm_per_step``, see :data:`damm.inferers.GATE_DECISIONS`); any of them with ``_mean<K>`` for the mean
            of ``K`` samples (e.g. ``damm_mean4``, ``damm_blend_mean4``).
        extra_predictors: other methods ``{name: predictor}``.

    Returns:
        ``{method name: predictor or None}`` in evaluation order.

    Raises:
        ValueError: an unknown branch name.
    """
    methods: dict[str, Any] = {"autoencoder_ceiling": None}
    for b in branches:
        methods[b] = DAMMPredictor(model, inferer.replace(**evaluation_branch(b)))
    methods.update(dict(extra_predictors or {}))
    return methods


def evaluation_branch(name: str) -> dict[str, Any]:
    """The sampler settings an evaluation branch name stands for (see :func:`evaluation_methods`).

    Args:
        name: ``<branch>[_<gate decision>][_mean<K>]``, e.g. ``uni``, ``damm_mean4``, ``damm_blend``.

    Returns:
        :meth:`damm.inferers.DAMMInferer.replace` arguments: ``branch``, ``num_samples`` and, where the name gives
        one, ``gate_decision``.

    Raises:
        ValueError: an unknown branch or decision, or ``K < 1``.
    """
    stem, _, k = str(name).partition("_mean")  # "damm_mean4": the mean of 4 samples of the gated prediction
    branch, _, decision = stem.partition("_")
    valid = branch in ("damm", "uni", "multi") and (not decision or (branch == "damm" and decision in GATE_DECISIONS))
    if not valid or (k and (not k.isdigit() or int(k) < 1)):
        raise ValueError(
            f"evaluation branch {name!r}: expected damm, uni or multi, damm_<decision> with a decision in "
            f"{GATE_DECISIONS}, optionally with _mean<K> (K >= 1)"
        )
    out: dict[str, Any] = {"branch": branch, "num_samples": int(k) if k else 1}
    if decision:
        out["gate_decision"] = decision
    return out


def pop_branch_statistics(predictor: Any, record: dict[str, Any]) -> None:
    """Move a DAMM predictor's per-step branch statistics into ``record`` and reset them for the next image.

    Args:
        predictor: any predictor; only :class:`DAMMPredictor` has statistics.
        record: the method's result record, updated in place.
    """
    if isinstance(predictor, DAMMPredictor):
        record["branch_statistics"] = predictor.summary()
        predictor.statistics.clear()


def mean_over_subjects(subjects: Mapping[str, Any]) -> dict[str, Any]:
    """Average PSNR / SSIM / MAE per method and region over the evaluated subjects (or fields).

    Args:
        subjects: ``{name: {"methods": {method: {region: {"psnr", "ssim", "mae"}, ...}}}}``.

    Returns:
        ``{method: {region: {"psnr", "ssim", "mae"}}}`` (NaN-aware means).
    """
    out: dict[str, Any] = {}
    for subj in subjects.values():
        for method, rec in subj["methods"].items():
            for region, vals in rec.items():
                if not isinstance(vals, dict) or "psnr" not in vals:
                    continue
                acc = out.setdefault(method, {}).setdefault(region, {"psnr": [], "ssim": [], "mae": []})
                for key in ("psnr", "ssim", "mae"):
                    acc[key].append(vals[key])
    return {
        method: {region: {k: float(np.nanmean(v)) for k, v in vals.items()} for region, vals in regions.items()}
        for method, regions in out.items()
    }


def format_results_table(results: Mapping[str, Any]) -> str:
    """Markdown table of the mean metrics per method and region.

    Args:
        results: output of a task's ``evaluate_task``.

    Returns:
        Markdown text.
    """
    lines = [
        f"# {results.get('task', 'task')}: {results.get('target')} from {results.get('conditions')}",
        "",
        str(results.get("metric_space", "")),
        "",
        "| method | region | PSNR (dB) | SSIM | MAE |",
        "|---|---|---|---|---|",
    ]
    for method, regions in results.get("mean", {}).items():
        for region, v in regions.items():
            lines.append(f"| {method} | {region} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['mae']:.4f} |")
    return "\n".join(lines) + "\n"


def write_task_evaluation(results: dict[str, Any], output_dir: str | Path) -> dict[str, Any]:
    """Add the means to ``results`` and write ``task_evaluation.json`` and ``task_evaluation.md`` atomically.

    Args:
        results: per-subject results (``results["subjects"]``), updated in place with ``results["mean"]``.
        output_dir: destination folder.

    Returns:
        ``results``.
    """
    results["mean"] = mean_over_subjects(results["subjects"])
    atomic_write_json(results, Path(output_dir) / "task_evaluation.json")
    atomic_write_text(format_results_table(results), Path(output_dir) / "task_evaluation.md")
    return results

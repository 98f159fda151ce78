"""Inference engine: synthesise the target modality for every item of a data loader (MONAI ``Evaluator``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents

from damm.schedulers import SAMPLER_SCHEDULERS

__all__ = ["SynthesisEvaluator", "describe_scheduler"]


def describe_scheduler(inferer: Any) -> dict[str, Any]:
    """JSON description of the inferer's noise schedule and sampler.

    Args:
        inferer: a :class:`damm.inferers.DAMMInferer`.

    Returns:
        ``{"training": {...}, "sampler": ..., "steps": ..., "eta": ...}``.
    """
    sched = inferer.scheduler
    betas = sched.betas
    return {
        "training_scheduler": type(sched).__name__,
        "num_train_timesteps": int(sched.num_train_timesteps),
        "beta_start": round(float(betas[0]), 6),
        "beta_end": round(float(betas[-1]), 6),
        "prediction_type": str(sched.prediction_type),
        "sampler": SAMPLER_SCHEDULERS[inferer.sampler],
        "num_inference_steps": inferer.num_inference_steps,
        "eta": inferer.eta if inferer.sampler == "ddim" else None,
    }


def _filenames(x: Any, n: int) -> list[str]:
    meta = getattr(x, "meta", None) or {}
    names = meta.get("filename_or_obj")
    if names is None:
        return [""] * n
    if isinstance(names, str):
        return [names] * n
    return [str(v) for v in names]


class SynthesisEvaluator(Evaluator):
    """Run :class:`damm.inferers.DAMMInferer` over a data loader; the output feeds ``SynthesisWriter``.

    Args:
        device: device.
        val_data_loader: yields dicts with one ``[B, C, *spatial]`` image per condition modality (MetaTensors
            keep the file names used as reference geometry).
        network: the composite :class:`damm.model.DAMMModel`.
        inferer: the sampler.
        reference_key: modality whose input file gives the output geometry (default: the anchor condition).
        epoch_length, non_blocking, iteration_update, postprocessing, val_handlers: as for MONAI's evaluators.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: torch.nn.Module,
        inferer: Any,
        reference_key: str | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Callable | None = None,
        val_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.network = network
        self.inferer = inferer
        self.reference_key = reference_key or network.conditions[0]

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        conditions = list(self.network.conditions)
        missing = [k for k in conditions if k not in batchdata]
        if missing:
            raise KeyError(f"SynthesisEvaluator: batch lacks the condition images {missing}; keys {sorted(batchdata)}")
        images = [torch.as_tensor(batchdata[k]).to(engine.state.device) for k in conditions]
        n = images[0].shape[0]
        result = self.inferer.sample(images, self.network)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        ids = batchdata.get("id")
        ids = [str(i) for i in ids] if isinstance(ids, (list, tuple)) else [""] * n
        inputs = [{k: _filenames(batchdata[k], n)[i] for k in conditions} for i in range(n)]
        output = {
            "pred": result.prediction,
            "std": result.std,
            "confidence_map": result.confidence_map,
            "stats": result.statistics(),
            "settings": result.settings,
            "scheduler": describe_scheduler(self.inferer),
            "reference": _filenames(batchdata[self.reference_key], n),
            "inputs": inputs,
            "id": ids,
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output

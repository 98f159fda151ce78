"""Ignite handlers and log helpers of the DAMM engines: progress bars, scalar logs, iteration filters.

Checkpoint saving, discovery, checked loading and resuming are shared with DRDM and live in
:mod:`ddcore.checkpoints`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ddcore.device import is_rank_zero

__all__ = [
    "ProgressBar",
    "TrackingOutputs",
    "every_n_iterations",
    "log_evaluation_mlflow",
    "register_finalizer",
    "run_finalizers",
    "scalar_logs",
]

logger = logging.getLogger(__name__)

#: when this process imported the module (the configs import it while parsing): an evaluation report older than
#: this was written by an earlier run and is not logged again by :func:`log_evaluation_mlflow`.
_PROCESS_START = time.time()
_FINALIZERS: dict[str, Callable[[], Any]] = {}


def register_finalizer(name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Register ``func(*args, **kwargs)`` to run once at the end of the bundle run (:func:`run_finalizers`).

    The tracking settings (``configs/mlflow.json``) register the evaluation logging this way (through ``_requires_``
    of their trainer handlers), so it runs from the ``finalize`` id of a single-process run and from
    ``multi_gpu_train.json``'s ``finalize`` before the process group closes. Registering a name again replaces it.

    Args:
        name: key of the finalizer.
        func: the callable.
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Returns:
        ``name``.
    """
    _FINALIZERS[name] = functools.partial(func, *args, **kwargs)
    return name


def run_finalizers() -> list[Any]:
    """Run (and forget) every registered finalizer, in registration order.

    Returns:
        Their results.
    """
    funcs = list(_FINALIZERS.values())
    _FINALIZERS.clear()
    return [f() for f in funcs]


def scalar_logs(output: Any) -> dict[str, float]:
    """Turn an engine output dict into ``{name: float}`` for ``StatsHandler``/``TensorBoardStatsHandler``.

    Args:
        output: ``engine.state.output`` of a DAMM trainer (a dict of scalars or 0-d tensors).

    Returns:
        Only the scalar entries, as floats.
    """
    if not isinstance(output, Mapping):
        return {}
    logs = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.detach().item()
        if isinstance(value, (int, float)):
            logs[str(key)] = float(value)
    return logs


def every_n_iterations(n: int) -> Callable[[Engine, int], bool]:
    """Ignite event filter firing every ``n``-th iteration (for ``StatsHandler(iteration_log=...)``).

    Args:
        n: period in iterations (>= 1).

    Returns:
        ``filter(engine, event) -> bool``.

    Raises:
        ValueError: if ``n < 1``.
    """
    if int(n) < 1:
        raise ValueError(f"every_n_iterations: n must be >= 1, got {n}.")
    n = int(n)

    def _filter(engine: Engine, event: int) -> bool:
        return event % n == 0

    return _filter


class ProgressBar:
    """A tqdm progress bar over an engine's iterations (ignite's ``ProgressBar``), shown on rank 0 only.

    Args:
        output_transform: maps ``engine.state.output`` to a dict of scalars shown next to the bar
            (default :func:`scalar_logs` restricted to ``keys``).
        keys: output keys to show (``None``: all scalars).
        persist: keep the bar after each epoch.
        disable: hide the bar (e.g. in tests or non-interactive logs).
    """

    def __init__(
        self,
        output_transform: Callable[[Any], Any] | None = None,
        keys: list[str] | None = None,
        persist: bool = False,
        disable: bool = False,
    ) -> None:
        self.keys = keys
        self.output_transform = output_transform
        self.persist = persist
        self.disable = disable

    def _transform(self, output: Any) -> dict[str, float]:
        logs = scalar_logs(output if self.output_transform is None else self.output_transform(output))
        return {k: v for k, v in logs.items() if self.keys is None or k in self.keys}

    def attach(self, engine: Engine) -> None:
        """Attach an ignite ``ProgressBar`` to ``engine`` (rank 0 only, unless disabled).

        Args:
            engine: trainer or evaluator.
        """
        if self.disable or not is_rank_zero():
            return
        from ignite.handlers import ProgressBar as _IgniteProgressBar

        _IgniteProgressBar(persist=self.persist).attach(engine, output_transform=self._transform)


class TrackingOutputs:
    """Let MONAI's default ``--tracking mlflow`` handler log the DAMM trainers' dict outputs.

    MONAI's default MLflow settings log ``from_engine(['loss'], first=True)(engine.state.output)``, which for a
    dict output is a one-element tuple that MLflow cannot log (``float() argument must be ... not 'tuple'``).
    Attached before the tracking handler, this switches every ``MLFlowHandler`` of the engine that still uses
    MONAI's ``from_engine`` transform to :func:`scalar_logs` when the engine starts (all scalars are logged).
    ``--tracking bundle/configs/mlflow.json`` needs none of this and also tracks stage 1 and the evaluation.
    """

    def attach(self, engine: Engine) -> None:
        """Register the switch on ``Events.STARTED``.

        Args:
            engine: a DAMM trainer.
        """
        engine.add_event_handler(Events.STARTED, self._switch)

    @staticmethod
    def _switch(engine: Engine) -> None:
        from monai.handlers import MLFlowHandler

        for event in (Events.ITERATION_COMPLETED, Events.EPOCH_COMPLETED):
            for func, *_ in engine._event_handlers.get(event, []):
                handler = getattr(func, "__self__", None)
                transform = getattr(handler, "output_transform", None)
                if isinstance(handler, MLFlowHandler) and "from_engine" in getattr(transform, "__qualname__", ""):
                    handler.output_transform = scalar_logs
                    logger.info("MLflow tracking: logging every scalar of the trainer output (scalar_logs)")


def _numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(_numeric_leaves(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and tree == tree and abs(tree) != float("inf"):
        out[prefix] = float(tree)
    return out


def log_evaluation_mlflow(
    output_dir: str | Path,
    tracking_uri: str | None,
    experiment_name: str,
    run_name: str = "evaluation",
    params: Mapping[str, Any] | None = None,
    report: str = "evaluation.json",
    artifacts: tuple[str, ...] = ("evaluation.json", "evaluation.md", "montage.png"),
) -> str | None:
    """Log the evaluation of this run to MLflow: every number of the report, the params, the report files.

    Rank 0 only. Skipped (``None``) when the report does not exist or predates this process (an earlier run's
    evaluation, e.g. after ``train_autoencoder``).

    Args:
        output_dir: the folder holding the evaluation report (``eval/``).
        tracking_uri: MLflow tracking URI.
        experiment_name: MLflow experiment.
        run_name: MLflow run name.
        params: parameters to log.
        report: the JSON report; its numeric leaves are logged as metrics named by their path
            (``methods/damm/all/psnr``).
        artifacts: files of ``output_dir`` logged as artefacts when present.

    Returns:
        The MLflow run id, or ``None`` when nothing was logged.
    """
    if not is_rank_zero():
        return None
    path = Path(output_dir) / report
    if not path.is_file() or path.stat().st_mtime < _PROCESS_START:
        return None
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name=run_name)
    run_id = run.info.run_id
    try:
        for key, value in (params or {}).items():
            client.log_param(run_id, key, str(value)[:6000])
        for key, value in _numeric_leaves(json.loads(path.read_text())).items():
            client.log_metric(run_id, key, value)
        for name in artifacts:
            if (Path(output_dir) / name).is_file():
                client.log_artifact(run_id, str(Path(output_dir) / name))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    logger.info(f"evaluation logged to MLflow run {run_id} ({tracking_uri})")
    return run_id

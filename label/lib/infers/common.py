"""What both infer tasks share: request parameters, client errors (4xx with the cause), scratch folders."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.studies import StudyError

__all__ = ["ClientError", "LabelInferTask", "as_client_error", "int_param"]

logger = logging.getLogger(__name__)


class ClientError(HTTPException):
    """A bad request (status 4xx); ``detail`` names the cause and the file."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(status_code=status_code, detail=message)


def int_param(request: dict[str, Any], name: str, default: int, low: int, high: int | None = None) -> int:
    """An integer request parameter in ``[low, high]`` (400 otherwise)."""
    value = request.get(name, default)
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        value = int(float(value))
    except (TypeError, ValueError):
        raise ClientError(f"parameter {name!r} must be an integer, got {value!r}", 400) from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ClientError(f"parameter {name!r} must be {bound}, got {value}", 400)
    return value


def _input_cause(err: BaseException) -> BaseException | None:
    """The first input error (ValueError / FileNotFoundError) in ``err``'s cause chain, e.g. under a
    ``RuntimeError('Failed to instantiate ...')`` of the config parser."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ValueError, FileNotFoundError, FileExistsError)):
            return err
        err = err.__cause__ or err.__context__
    return None


def as_client_error(err: BaseException, study: str) -> HTTPException:
    """Map an exception of a request to the HTTP error the client gets (4xx for bad input, else 500)."""
    if isinstance(err, HTTPException):
        return err
    if isinstance(err, StudyError):
        return ClientError(str(err), 404 if "not found" in str(err) else 422)
    cause = _input_cause(err)
    if cause is not None:
        status = 404 if isinstance(cause, FileNotFoundError) else 422
        return ClientError(f"study {study}: {type(cause).__name__}: {cause}", status)
    logger.exception("inference failed for %s", study)
    return HTTPException(status_code=500, detail=f"study {study}: {type(err).__name__}: {err}")


class LabelInferTask(InferTask):
    """An ``others`` infer task running one request at a time in a scratch folder; errors become HTTP errors.

    Subclasses implement :meth:`run` ``(request, work_dir) -> (result file, result json)``; the result file is
    moved out of the scratch folder (MONAI Label deletes it after sending).
    """

    def __init__(self, labels: Any, dimension: int, description: str, config: dict[str, Any]) -> None:
        super().__init__(
            type=InferType.OTHERS, labels=labels, dimension=dimension, description=description, config=config
        )
        self._lock = threading.Lock()

    def is_valid(self) -> bool:
        return True

    def run(self, request: dict[str, Any], work_dir: Path) -> tuple[Path, dict[str, Any]]:
        raise NotImplementedError

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        study = str(request.get("image") or "")
        work_dir = Path(tempfile.mkdtemp(prefix="damm_label_"))
        try:
            with self._lock:
                result_file, result_json = self.run(request, work_dir)
            suffix = "".join(result_file.suffixes[-2:]) if result_file.name.endswith(".nii.gz") else result_file.suffix
            handle, name = tempfile.mkstemp(prefix="damm_label_result_", suffix=suffix)
            os.close(handle)
            out = Path(name)
            shutil.move(str(result_file), out)
            return str(out), result_json
        except Exception as err:
            raise as_client_error(err, Path(study).name or "<none>") from err
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    import time

    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start

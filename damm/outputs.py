"""Per-sample inference outputs: the prediction in the input's format and geometry, a confidence map, a JSON sidecar.

- Microscopy tiles (PNG/TIFF): the prediction is mapped back to the input intensity scale and written with the
  reference file's format, size and integer type (8- or 16-bit PNG, TIFF of the same dtype).
- Volumes (NIfTI): the prediction is written on the reference image's grid by :func:`ddcore.images.save_nifti_like`
  (the project's one NIfTI writer: affine, qform and sform with their codes kept).
- The confidence map (UAFM ``u``, resized to the image) is written as float32 TIFF (microscopy) or NIfTI (volumes).
- The sidecar records the model version, scheduler, steps, seed and the branch statistics.

Every file goes through :func:`ddcore.atomic.atomic_path` (temporary file, then rename). :func:`to_input_scale` and
:func:`write_tiff` are also the real-data tasks' (:mod:`damm.tasks`) way back to the input's scale and format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ddcore.atomic import atomic_path, atomic_write_json
from ddcore.images import save_nifti_like
from transforms.intensity import denormalise

__all__ = [
    "SynthesisWriter",
    "output_stem",
    "read_reference_info",
    "to_input_scale",
    "write_confidence_like",
    "write_image_like",
    "write_tiff",
]

logger = logging.getLogger(__name__)

_NIFTI = (".nii", ".nii.gz")
_TIFF = (".tif", ".tiff")
_PNG = (".png",)


def _suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def output_stem(path: str | Path) -> str:
    """File name without its (possibly double) extension.

    Args:
        path: a file path.

    Returns:
        ``tile_001`` for ``.../tile_001.png`` or ``.../case.nii.gz``.
    """
    name = Path(path).name
    suffix = _suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


def read_reference_info(path: str | Path) -> dict[str, Any]:
    """Format, shape and dtype (and, for NIfTI, affine) of a reference input file.

    Args:
        path: the input file whose geometry the outputs must keep.

    Returns:
        ``{"format", "shape", "dtype", ["affine"]}``.

    Raises:
        ValueError: for an unsupported extension.
    """
    suffix = _suffix(path)
    if suffix in _NIFTI:
        import nibabel as nib

        img = nib.load(str(path))  # header only (the voxels are not read)
        return {"format": "nifti", "shape": tuple(img.shape), "dtype": str(img.get_data_dtype()), "affine": img.affine}
    if suffix in _TIFF:
        import tifffile

        arr = tifffile.imread(str(path))
        return {"format": "tiff", "shape": tuple(arr.shape), "dtype": str(arr.dtype)}
    if suffix in _PNG or suffix in (".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(path) as img:
            arr = np.asarray(img)
        fmt = "png" if suffix in _PNG else "jpeg"
        return {"format": fmt, "shape": tuple(arr.shape), "dtype": str(arr.dtype)}
    raise ValueError(f"unsupported reference format '{suffix}' of {path}; expected PNG, TIFF, JPEG or NIfTI")


def to_input_scale(
    prediction: np.ndarray | torch.Tensor, value_range: Sequence[float] | Mapping[str, float], dtype: str
) -> np.ndarray:
    """Map a ``[-1, 1]`` prediction to ``value_range`` and cast to ``dtype`` (rounded and clipped for integers).

    Args:
        prediction: normalised prediction (array or tensor, any shape).
        value_range: ``(lower, upper)`` input intensities that ``-1`` and ``1`` stand for, or a mapping with
            ``"lower"`` and ``"upper"`` (a task's intensity reference).
        dtype: output dtype name (``uint8``, ``uint16``, ``float32``...).

    Returns:
        The array in the input scale, e.g. ``to_input_scale([-1, 0, 1, 3], (10, 250), "uint8") -> [10, 130, 250,
        255]``.
    """
    if isinstance(value_range, Mapping):
        lo, hi = float(value_range["lower"]), float(value_range["upper"])
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
    if isinstance(prediction, torch.Tensor):
        prediction = prediction.detach().cpu().double()
    params = {"lower": lo, "upper": hi, "out_min": -1.0, "out_max": 1.0}
    y = np.asarray(denormalise(torch.as_tensor(np.asarray(prediction, dtype=np.float64)), params))
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        y = np.clip(np.rint(y), info.min, info.max)
    return y.astype(dt)


def write_tiff(array: np.ndarray, path: str | Path) -> Path:
    """Write an array as TIFF (dtype kept) atomically.

    Args:
        array: image.
        path: destination.

    Returns:
        ``path``.
    """
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(str(tmp), np.ascontiguousarray(array))
    return Path(path)


def _squeeze_channel(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``[1, *spatial]`` -> ``shape`` (channel-last RGB references keep one channel replicated)."""
    a = np.asarray(array)
    if a.ndim == len(shape) + 1 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == len(shape) - 1 and len(shape) >= 3 and shape[-1] in (3, 4) and a.shape == tuple(shape[:-1]):
        a = np.repeat(a[..., None], shape[-1], axis=-1)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(
            f"prediction shape {tuple(a.shape)} does not match the input geometry {tuple(shape)} (was the input "
            "resized or cropped by the pipeline?)"
        )
    return a


def write_image_like(
    prediction: np.ndarray | torch.Tensor,
    reference: str | Path,
    path: str | Path,
    value_range: Sequence[float] = (-1.0, 1.0),
) -> Path:
    """Write a normalised prediction with the format, size, dtype (and affine) of ``reference``.

    Args:
        prediction: ``[1, *spatial]`` or ``[*spatial]`` prediction in ``[-1, 1]``.
        reference: the input file whose geometry to keep.
        path: destination without or with extension (the reference's extension is used).
        value_range: input intensities that ``-1`` and ``1`` stand for.

    Returns:
        The written path.
    """
    info = read_reference_info(reference)
    suffix = _suffix(reference)
    path = Path(path)
    if _suffix(path) != suffix:
        path = path.with_name(output_stem(path) + suffix)
    arr = np.asarray(prediction.detach().cpu() if isinstance(prediction, torch.Tensor) else prediction)
    dtype = info["dtype"] if info["format"] != "nifti" else "float32"
    arr = to_input_scale(arr, value_range, dtype)
    arr = _squeeze_channel(arr, info["shape"])
    if info["format"] == "nifti":
        return save_nifti_like(arr, reference, path, dtype=np.float32)
    if info["format"] == "tiff":
        return write_tiff(arr, path)
    from PIL import Image

    if info["format"] == "jpeg":
        path = path.with_suffix(".png")  # lossless output next to lossy input
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(str(tmp), format="PNG")
    return path


def write_confidence_like(confidence: np.ndarray | torch.Tensor, reference: str | Path, path: str | Path) -> Path:
    """Write a ``[0, 1]`` confidence map as float32 TIFF (2D inputs) or NIfTI with the reference affine (volumes).

    Args:
        confidence: ``[1, *spatial]`` or ``[*spatial]``.
        reference: the input file whose geometry to keep.
        path: destination stem (the extension is chosen here).

    Returns:
        The written path.
    """
    arr = np.asarray(confidence.detach().cpu() if isinstance(confidence, torch.Tensor) else confidence, np.float32)
    path = Path(path)
    info = read_reference_info(reference)
    if info["format"] == "nifti":
        arr = _squeeze_channel(arr, info["shape"])
        return save_nifti_like(arr, reference, path.with_name(output_stem(path) + ".nii.gz"), dtype=np.float32)
    shape = info["shape"][:2] if len(info["shape"]) == 3 and info["shape"][-1] in (3, 4) else info["shape"]
    arr = _squeeze_channel(arr, shape)
    return write_tiff(arr, path.with_name(output_stem(path) + ".tif"))


def _item_value(batch: Mapping[str, Any], key: str, index: int) -> Any:
    value = batch.get(key)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return value[index]
    if isinstance(value, torch.Tensor):
        return value[index].item() if value.ndim >= 1 and value[index].numel() == 1 else value[index]
    return value


class SynthesisWriter:
    """Ignite handler writing every sample's prediction, confidence map and JSON sidecar.

    Reads the output of :class:`damm.engines.SynthesisEvaluator` (``pred``, ``std``, ``confidence_map``,
    ``stats``, ``reference``, ``id``) at ``ITERATION_COMPLETED``.

    Args:
        output_dir: destination folder.
        value_range: input intensities that the normalised ``-1``/``1`` stand for (the target's range).
        postfix: appended to the output file names (``<id>_<postfix>.png``).
        model_version: recorded in the sidecar (e.g. ``@_meta_#version``).
        write_std: also write the per-pixel standard deviation over the K samples (float32 TIFF/NIfTI).
        extra: additional JSON-serialisable fields for every sidecar (e.g. the checkpoint path).
    """

    def __init__(
        self,
        output_dir: str | Path,
        value_range: Sequence[float],
        postfix: str,
        model_version: str = "",
        write_std: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.value_range = tuple(float(v) for v in value_range)
        self.model_version = str(model_version)
        self.postfix = postfix
        self.write_std = write_std
        self.extra = dict(extra or {})
        self.written: list[dict[str, str]] = []

    def attach(self, engine: Engine) -> None:
        """Register at ``ITERATION_COMPLETED``.

        Args:
            engine: the synthesis evaluator.
        """
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Write the outputs of the current batch.

        Args:
            engine: the synthesis evaluator.
        """
        out = engine.state.output
        for i, reference in enumerate(out["reference"]):
            sample_id = out["id"][i] or output_stem(reference)
            stem = self.output_dir / f"{sample_id}_{self.postfix}"
            files = {"prediction": str(write_image_like(out["pred"][i], reference, stem, self.value_range))}
            if out.get("confidence_map") is not None:
                files["confidence"] = str(
                    write_confidence_like(
                        out["confidence_map"][i], reference, self.output_dir / f"{sample_id}_confidence"
                    )
                )
            if self.write_std and out["settings"].get("num_samples", 1) > 1:
                files["std"] = str(
                    write_confidence_like(out["std"][i], reference, self.output_dir / f"{sample_id}_std")
                )
            sidecar = {
                "id": sample_id,
                "model_version": self.model_version,
                "inputs": out["inputs"][i],
                "reference_geometry": reference,
                "outputs": {k: Path(v).name for k, v in files.items()},
                "value_range": list(self.value_range),
                "sampling": out["settings"],
                "scheduler": out["scheduler"],
                "branch_statistics": out["stats"][i],
                **self.extra,
            }
            json_path = self.output_dir / f"{sample_id}_{self.postfix}.json"
            atomic_write_json(json.loads(json.dumps(sidecar, default=str)), json_path)
            files["sidecar"] = str(json_path)
            self.written.append(files)

"""Fluorescence channel prediction on real microscopy fields: tiled training, whole-field sliding-window inference.

Protocol (our own design):

- **Fields and channels.** Fields stored one file per channel, grouped by :func:`data_prep.microscopy.find_fields`
  (e.g. ``fly/POS002_dapi.tif``; or one folder per field: ``human/dna.tif``). Defaults: ``rhodamine`` from
  ``fitc`` (anchor) and ``dapi`` for the fly data; ``ph3`` from ``dna`` and ``cellbody`` for the human data.
- **Normalisation.** Per field and channel, the ``[lower, upper]`` percentiles of the whole field map to
  ``[-1, 1]`` (clipped), so tiles of one field share one intensity scale and whole-field inference sees the same
  scale as training.
- **Splits.** With few fields (``split_mode="auto"`` and fewer than 3 fields, or ``"region"``) each field is split
  spatially: its right-most ``heldout_fraction`` of columns is held out (test, and validation for monitoring
  only); a ``gap`` of columns before it is used for nothing; training tiles (``tile_size``, ``stride``) come from
  the rest. With more fields, a field-level split (``"fields"``) is used.
- **Inference.** Whole fields by overlapping windows with Gaussian blending (MONAI ``SlidingWindowInferer``; each
  window batch is one call of the diffusion sampler, with its own seed), mapped back to the input intensity scale
  and written as TIFF of the input size and dtype (clipped to the dtype's range).
- **Evaluation.** PSNR, SSIM and MAE in ``[0, 1]`` (target's percentile range) over the held-out region.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from monai.inferers import SlidingWindowInferer

from damm.tasks.common import (
    AutoencoderCeiling,
    DAMMPredictor,
    evaluation_methods,
    model_fingerprint,
    pop_branch_statistics,
    read_intensity_reference,
    write_intensity_reference,
    write_task_evaluation,
)
from damm.tasks.metrics import region_metrics, to_unit
from data_prep.datalist import assign_splits
from data_prep.microscopy import DEFAULT_PATTERN, find_fields, tile_positions
from ddcore.atomic import atomic_path, atomic_write_json
from transforms.intensity import normalise, robust_range

__all__ = [
    "FieldInference",
    "MicroscopyTaskData",
    "evaluate_task",
    "load_field",
    "predict_field",
    "read_channel",
    "synthesise_field_to_file",
    "to_input_scale",
    "write_tiff_like",
]

logger = logging.getLogger(__name__)


def read_channel(path: str | Path) -> np.ndarray:
    """Read one channel image (TIFF via tifffile, PNG via PIL) as a 2D array (RGB collapsed by max).

    Args:
        path: image file.

    Returns:
        2D array in its stored dtype.

    Raises:
        FileNotFoundError: missing file.
        ValueError: unreadable or not 2D.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"channel image not found: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = np.asarray(tifffile.imread(str(path)))
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as err:
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].max(axis=-1)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2D single-channel image, got shape {arr.shape}")
    return arr


def load_field(
    files: Mapping[str, str | Path], keys: Sequence[str], lower: float = 0.5, upper: float = 99.9
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]], dict[str, Any]]:
    """Read a field's channels, check they share one size, normalise each to ``[-1, 1]``.

    Args:
        files: ``{channel: path}``.
        keys: channels to load (all must be in ``files``).
        lower: lower percentile.
        upper: upper percentile.

    Returns:
        ``({key: [1, H, W]}, {key: {"lower", "upper"}}, {"shape", "dtype"})`` (dtype of the first key).

    Raises:
        ValueError: a missing channel, channels of different sizes, a constant channel.
        FileNotFoundError: a missing file.
    """
    missing = [k for k in keys if k not in files]
    if missing:
        raise ValueError(f"missing channels {missing}; found {sorted(files)}")
    arrays = {k: read_channel(files[k]) for k in keys}
    shapes = {k: a.shape for k, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k}: {Path(files[k]).name} {s}" for k, s in shapes.items())
        raise ValueError(f"channels differ in size ({desc}); every channel of a field must have the same size")
    images, params = {}, {}
    for k, a in arrays.items():
        t = torch.as_tensor(a.astype(np.float32))
        lo, hi = robust_range(t, lower, upper)
        if not hi > lo:
            raise ValueError(f"channel {k!r} ({files[k]}) is constant (value {lo:g}); expected an image with contrast")
        images[k] = normalise(t, lo, hi)[None].float()
        params[k] = {"lower": lo, "upper": hi}
    first = arrays[keys[0]]
    return images, params, {"shape": tuple(first.shape), "dtype": str(first.dtype)}


def to_input_scale(prediction: torch.Tensor | np.ndarray, intensity: Mapping[str, float], dtype: str) -> np.ndarray:
    """Map a ``[-1, 1]`` prediction to ``[lower, upper]`` and cast to ``dtype`` (rounded, clipped to its range).

    Args:
        prediction: ``[H, W]`` prediction.
        intensity: ``{"lower", "upper"}``.
        dtype: output dtype name.

    Returns:
        The array.
    """
    p = np.asarray(torch.as_tensor(prediction).float().numpy(), dtype=np.float64)
    y = float(intensity["lower"]) + (p + 1.0) / 2.0 * (float(intensity["upper"]) - float(intensity["lower"]))
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        y = np.clip(np.rint(y), info.min, info.max)
    return y.astype(dt)


def write_tiff_like(array: np.ndarray, path: str | Path) -> Path:
    """Write a 2D array as TIFF atomically.

    Args:
        array: image.
        path: destination.

    Returns:
        ``path``.
    """
    with atomic_path(path) as tmp:
        tifffile.imwrite(str(tmp), np.ascontiguousarray(array))
    return Path(path)


def predict_field(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    images: Sequence[torch.Tensor],
    tile_size: int = 64,
    overlap: float = 0.25,
    sw_batch_size: int = 16,
    mode: str = "gaussian",
) -> torch.Tensor:
    """Whole-field prediction by overlapping windows blended with MONAI's ``SlidingWindowInferer``.

    Args:
        predictor: ``[B, n_in, t, t] -> [B, 1, t, t]``.
        images: inputs ``[1, H, W]`` each (anchor first).
        tile_size: window side (a multiple of the model's downsampling).
        overlap: window overlap fraction.
        sw_batch_size: windows per predictor call.
        mode: blending (``"gaussian"`` or ``"constant"``).

    Returns:
        ``[1, H, W]`` prediction in ``[-1, 1]``.
    """
    x = torch.cat([torch.as_tensor(i).float() for i in images])[None]
    sw = SlidingWindowInferer(
        roi_size=(int(tile_size), int(tile_size)),
        sw_batch_size=int(sw_batch_size),
        overlap=float(overlap),
        mode=mode,
        padding_mode="reflect",
        progress=False,
    )
    with torch.no_grad():
        out = sw(x, predictor)
    return torch.as_tensor(out)[0, :1].float().clamp(-1.0, 1.0)


class MicroscopyTaskData:
    """Training tiles and evaluation fields of a folder of fluorescence fields, with the configured split.

    Args:
        dataset_dir: folder with the channel files.
        target: target channel.
        conditions: condition channels, anchor first.
        pattern: file-stem regex (see :func:`data_prep.microscopy.find_fields`).
        split_mode: ``"auto"`` (``"region"`` with fewer than 3 fields, else ``"fields"``), ``"region"`` or
            ``"fields"``.
        heldout_fraction: region split: right-most fraction of columns held out.
        gap: region split: unused columns before the held-out part (default ``tile_size // 2``).
        tile_size: training tile side.
        stride: training tile step (default ``tile_size // 2``).
        lower: normalisation lower percentile.
        upper: normalisation upper percentile.
        val_fraction: field split: validation fraction.
        test_fraction: field split: test fraction.
        seed: field split seed.
        multiple: tile sizes must be divisible by this (model downsampling).
        reference_path: where to write the target's training intensity reference.

    Raises:
        ValueError: invalid settings.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        target: str = "rhodamine",
        conditions: Sequence[str] = ("fitc", "dapi"),
        pattern: str = DEFAULT_PATTERN,
        split_mode: str = "auto",
        heldout_fraction: float = 0.25,
        gap: int | None = None,
        tile_size: int = 64,
        stride: int | None = None,
        lower: float = 0.5,
        upper: float = 99.9,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        multiple: int = 16,
        reference_path: str | Path | None = None,
    ) -> None:
        if split_mode not in ("auto", "region", "fields"):
            raise ValueError(f"split_mode must be 'auto', 'region' or 'fields', got {split_mode!r}")
        if not 0.0 < float(heldout_fraction) < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        if int(tile_size) % int(multiple):
            raise ValueError(f"tile_size {tile_size} must be divisible by the model's downsampling {multiple}")
        if len({target, *conditions}) != 1 + len(conditions) or not conditions:
            raise ValueError(f"target {target!r} and conditions {list(conditions)} must be distinct and non-empty")
        self.dataset_dir = Path(dataset_dir).expanduser()
        self.target, self.conditions = target, list(conditions)
        self.pattern = pattern
        self.split_mode = split_mode
        self.heldout_fraction = float(heldout_fraction)
        self.tile_size = int(tile_size)
        self.gap = self.tile_size // 2 if gap is None else int(gap)
        self.stride = self.tile_size // 2 if stride is None else int(stride)
        self.lower, self.upper = float(lower), float(upper)
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.multiple = int(multiple)
        self.reference_path = None if reference_path is None else Path(reference_path)
        self._fields: dict[str, dict[str, Any]] | None = None
        self._items: dict[str, list[dict[str, Any]]] | None = None

    @property
    def modalities(self) -> list[str]:
        """Target first, then the conditions."""
        return [self.target, *self.conditions]

    def fields(self) -> dict[str, dict[str, Any]]:
        """Fields holding every configured channel, with their split.

        Returns:
            ``{field: {"files": {channel: Path}, "split": str | None}}`` (``None`` under the region split).

        Raises:
            ValueError: no field has every channel.
        """
        if self._fields is not None:
            return self._fields
        found = {
            f: {"files": files, "split": None}
            for f, files in find_fields(self.dataset_dir, self.pattern).items()
            if all(k in files for k in self.modalities)
        }
        if not found:
            raise ValueError(f"{self.dataset_dir}: no field has all channels {self.modalities}")
        if self.resolved_split_mode(len(found)) == "fields":
            split_of = assign_splits(sorted(found), self.val_fraction, self.test_fraction, self.seed)
            for f in found:
                found[f]["split"] = split_of[f]
        self._fields = found
        return found

    def resolved_split_mode(self, n_fields: int | None = None) -> str:
        """``"region"`` or ``"fields"``.

        Args:
            n_fields: number of fields (default: counted).

        Returns:
            The split mode in use.
        """
        if self.split_mode != "auto":
            return self.split_mode
        n = len(self.fields()) if n_fields is None else n_fields
        return "fields" if n >= 3 else "region"

    def heldout_columns(self, width: int) -> tuple[int, int]:
        """Region split: ``(train_end, test_start)`` columns (training tiles lie in ``[0, train_end)``).

        Args:
            width: field width.

        Returns:
            The two column indices.

        Raises:
            ValueError: the training part is narrower than a tile.
        """
        test_start = width - round(width * self.heldout_fraction)
        train_end = test_start - self.gap
        if train_end < self.tile_size:
            raise ValueError(
                f"field width {width}: the training part ({train_end} columns) is narrower than a tile "
                f"({self.tile_size}); lower heldout_fraction or gap"
            )
        return train_end, test_start

    def check(self) -> dict[str, int]:
        """Read every field once (channel sizes must agree) before training starts.

        Returns:
            Number of fields per split.

        Raises:
            ValueError: bad fields (names the files).
        """
        counts: dict[str, int] = {}
        for name, info in self.fields().items():
            shapes = {k: read_channel(info["files"][k]).shape for k in self.modalities}
            if len(set(shapes.values())) > 1:
                desc = ", ".join(f"{k}: {Path(info['files'][k]).name} {s}" for k, s in shapes.items())
                raise ValueError(f"field {name!r}: channels differ in size ({desc})")
            split = info["split"] or "training+test (region split)"
            counts[split] = counts.get(split, 0) + 1
        logger.info(f"microscopy task: {counts}, target {self.target!r} from {self.conditions}")
        return counts

    def _prepare(self) -> dict[str, list[dict[str, Any]]]:
        if self._items is not None:
            return self._items
        self.check()
        region = self.resolved_split_mode() == "region"
        tiles: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
        ref = []
        t = self.tile_size
        for name, info in self.fields().items():
            images, params, meta = load_field(info["files"], self.modalities, self.lower, self.upper)
            h, w = meta["shape"]
            if h < t or w < t:
                raise ValueError(f"field {name!r} ({h}x{w}) is smaller than the tile size {t}")
            boxes: list[tuple[str, int, int]] = []
            if region:
                train_end, test_start = self.heldout_columns(w)
                boxes += [
                    ("training", y, x)
                    for y in tile_positions(h, t, self.stride)
                    for x in tile_positions(train_end, t, self.stride)
                ]
                if w - test_start >= t:
                    boxes += [
                        ("test", y, test_start + x)
                        for y in tile_positions(h, t, t)
                        for x in tile_positions(w - test_start, t, t)
                    ]
                ref.append(params[self.target])
            else:
                split = info["split"]
                if split == "test":
                    continue
                step = self.stride if split == "training" else t
                boxes += [(split, y, x) for y in tile_positions(h, t, step) for x in tile_positions(w, t, step)]
                if split == "training":
                    ref.append(params[self.target])
            for split, y, x in boxes:
                rec: dict[str, Any] = {"id": f"{name}_y{y:05d}_x{x:05d}", "field": name, "y": y, "x": x}
                for k in self.modalities:
                    rec[k] = images[k][:, y : y + t, x : x + t].clone()
                tiles[split].append(rec)
                if region and split == "test":
                    tiles["validation"].append(rec)
        if not tiles["training"]:
            raise ValueError("microscopy task: no training tile")
        if self.reference_path is not None and ref:
            write_intensity_reference(self.reference_path, self.target, ref)
        logger.info("microscopy task tiles: " + ", ".join(f"{k}={len(v)}" for k, v in tiles.items()))
        self._items = tiles
        return tiles

    def items(self, split: str) -> list[dict[str, Any]]:
        """In-memory tile items ``{"id", "field", "y", "x", <channel>: [1, t, t]}`` of a split.

        Args:
            split: ``"training"``, ``"validation"`` or ``"test"``.

        Returns:
            The items.

        Raises:
            ValueError: unknown or empty split.
        """
        tiles = self._prepare()
        if split not in tiles:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(tiles)}")
        if not tiles[split]:
            raise ValueError(f"microscopy task: split {split!r} has no tile")
        return tiles[split]

    def evaluation_fields(self) -> list[tuple[str, dict[str, Path], int | None]]:
        """Fields evaluated after training.

        Returns:
            ``[(field, files, first held-out column or None)]``: every field with its held-out part under the region
            split, the test fields (whole) under the field split.
        """
        out = []
        for name, info in self.fields().items():
            if self.resolved_split_mode() == "region":
                w = read_channel(info["files"][self.target]).shape[1]
                out.append((name, info["files"], self.heldout_columns(w)[1]))
            elif info["split"] == "test":
                out.append((name, info["files"], None))
        return out


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

    Only the held-out columns plus half a tile of context are synthesised (the rest was seen in training).

    Args:
        model: :class:`damm.workflow.DAMMModel`.
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
    from damm.workflow import load_model

    if load and model_path is not None:
        load_model(model, model_path)
    model.eval()
    output_dir = Path(output_dir)
    results: dict[str, Any] = {
        "task": "microscopy",
        "target": task.target,
        "conditions": task.conditions,
        "split_mode": task.resolved_split_mode(),
        "heldout_fraction": task.heldout_fraction,
        "gap": task.gap,
        "tile_size": task.tile_size,
        "overlap": overlap,
        "sampler": inferer.settings(),
        "model": model_fingerprint(model_path),
        "metric_space": f"held-out columns, both images mapped to [0, 1] with the target field's [p{task.lower}, "
        f"p{task.upper}] range; PSNR max 1; SSIM Gaussian window {ssim_win_size}",
        "subjects": {},
    }
    methods = evaluation_methods(model, inferer, branches, extra_predictors)
    t = task.tile_size
    for name, files, x0 in task.evaluation_fields():
        images, params, meta = load_field(files, task.modalities, task.lower, task.upper)
        start = 0 if x0 is None else max(0, x0 - t // 2)
        crop = {k: v[:, :, start:] for k, v in images.items()}
        eval_from = 0 if x0 is None else x0 - start
        tp = params[task.target]
        true_u = to_unit(read_channel(files[task.target])[:, start:].astype(np.float32), tp["lower"], tp["upper"])
        mask = torch.zeros_like(true_u, dtype=torch.bool)
        mask[:, eval_from:] = True
        subj: dict[str, Any] = {"files": {k: str(v) for k, v in files.items()}, "eval_columns": [x0, meta["shape"][1]]}
        subj["methods"] = {}
        for method, predictor in methods.items():
            t0 = time.perf_counter()
            if method == "autoencoder_ceiling":
                ceiling = AutoencoderCeiling(model.autoencoders[task.target], sw_batch_size, inferer.precision)
                pred = predict_field(ceiling, [crop[task.target]], t, overlap, sw_batch_size)
            else:
                pred = predict_field(predictor, [crop[k] for k in task.conditions], t, overlap, sw_batch_size)
            secs = time.perf_counter() - t0
            out = to_input_scale(pred[0], tp, meta["dtype"])
            rec: dict[str, Any] = {"seconds": secs}
            rec.update(
                region_metrics(
                    to_unit(out.astype(np.float32), tp["lower"], tp["upper"]),
                    true_u,
                    {"heldout": mask},
                    win_size=ssim_win_size,
                    axis=None,
                )
            )
            pop_branch_statistics(predictor, rec)
            subj["methods"][method] = rec
            if write_images:
                slug = name.replace("/", "_")
                write_tiff_like(out, output_dir / slug / f"{method}_{task.target}_x{start}.tif")
            logger.info(f"{name} {method}: {rec['heldout']} ({secs:.1f} s)")
        results["subjects"][name] = subj
    return write_task_evaluation(results, output_dir)


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
) -> Path:
    """Whole-field synthesis written as TIFF of the input size and dtype, with a JSON sidecar.

    Args:
        model: the loaded model.
        inferer: the sampler.
        condition_files: ``{condition: path}``.
        out_path: TIFF destination (the sidecar is ``<stem>.json``).
        task: task settings.
        intensity_reference: ``{"lower", "upper"}`` or the JSON written at training (used unless ``true_target``).
        true_target: the real target file (its intensity range is then used).
        overlap: window overlap.
        sw_batch_size: windows per sampler call.
        model_path: recorded in the sidecar.
        overwrite: replace an existing output.

    Returns:
        ``out_path``.

    Raises:
        FileExistsError: the output exists and ``overwrite`` is false.
        ValueError: bad inputs (missing channel, channels of different sizes) or no intensity reference.
    """
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"output {out_path} exists; pass overwrite=True to replace it")
    t0 = time.perf_counter()
    files = dict(condition_files)
    keys = list(task.conditions)
    if true_target is not None:
        files[task.target] = true_target
        keys.append(task.target)
    images, params, meta = load_field(files, keys, task.lower, task.upper)
    if true_target is not None:
        intensity, source = params[task.target], f"the field's real {task.target}"
    elif isinstance(intensity_reference, Mapping):
        intensity, source = dict(intensity_reference), "given"
    elif intensity_reference is not None:
        intensity, source = read_intensity_reference(intensity_reference, task.target), str(intensity_reference)
    else:
        raise ValueError("no intensity reference: give the training reference JSON (models/target_intensity.json)")
    predictor = DAMMPredictor(model, inferer)
    pred = predict_field(predictor, [images[k] for k in task.conditions], task.tile_size, overlap, sw_batch_size)
    out = to_input_scale(pred[0], intensity, meta["dtype"])
    write_tiff_like(out, out_path)
    atomic_write_json(
        {
            "generated_by": "damm.tasks (DAMM-Diffusion channel prediction)",
            "synthetic": True,
            "target": task.target,
            "conditions": task.conditions,
            "inputs": {k: str(Path(v).resolve()) for k, v in condition_files.items()},
            "model": model_fingerprint(model_path),
            "sampler": inferer.settings(),
            "steps": inferer.num_inference_steps,
            "seed": inferer.seed,
            "tile_size": task.tile_size,
            "overlap": overlap,
            "intensity_mapping": {**{k: float(v) for k, v in intensity.items()}, "source": source},
            "branch_statistics": predictor.summary(),
            "seconds": time.perf_counter() - t0,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        out_path.with_suffix(".json"),
    )
    return out_path


class FieldInference:
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
    ) -> None:
        self.model, self.inferer, self.task = model, inferer, task
        self.output_dir = Path(output_dir)
        self.intensity_reference = intensity_reference
        self.model_path = model_path
        self.overlap, self.sw_batch_size, self.overwrite = overlap, sw_batch_size, overwrite

    def run(self) -> list[Path]:
        """Synthesise every field (all outputs checked before the first one is computed).

        Returns:
            The written TIFF paths.
        """
        jobs = []
        for name, info in self.task.fields().items():
            out = self.output_dir / f"{name.replace('/', '_')}_{self.task.target}.tif"
            if out.exists() and not self.overwrite:
                raise FileExistsError(f"output {out} exists; set overwrite to replace it")
            jobs.append((info["files"], out))
        return [
            synthesise_field_to_file(
                self.model,
                self.inferer,
                {k: files[k] for k in self.task.conditions},
                out,
                self.task,
                self.intensity_reference,
                files.get(self.task.target),
                self.overlap,
                self.sw_batch_size,
                self.model_path,
                self.overwrite,
            )
            for files, out in jobs
        ]

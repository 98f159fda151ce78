"""Microscopy task data: fields, checks, the region or field split, training tiles, whole-field prediction and the
evaluation cases: the :class:`~damm.tasks.protocol.RealDataTask` for fluorescence fields (see
:mod:`damm.tasks.microscopy`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from damm.outputs import to_input_scale, write_tiff
from damm.tasks.common import write_intensity_reference
from damm.tasks.metrics import to_unit
from damm.tasks.microscopy_files import DEFAULT_PATTERN, find_fields, read_channel, tile_positions
from damm.tasks.protocol import EvaluationCase, RealDataTask
from transforms.checks import check_coregistered, geometry_from_affine
from transforms.intensity import normalise, robust_range

__all__ = ["MicroscopyTaskData", "PreparedField", "check_same_size", "load_field", "predict_field"]

logger = logging.getLogger(__name__)


def check_same_size(arrays: Mapping[str, np.ndarray], files: Mapping[str, str | Path]) -> None:
    """The channels of a field must share one size (:func:`transforms.checks.check_coregistered` on shapes).

    Args:
        arrays: ``{channel: 2D array}``.
        files: ``{channel: path}`` (for the message).

    Raises:
        ValueError: channels of different sizes (names every file with its shape).
    """
    check_coregistered(
        {k: geometry_from_affine(a.shape) for k, a in arrays.items()},
        {k: Path(files[k]).name for k in arrays},
        what="channels",
    )


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
    check_same_size(arrays, files)
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


@dataclass
class PreparedField:
    """A field read and normalised for whole-field prediction.

    Attributes:
        name: field id.
        files: ``{channel: path}``.
        images: ``{channel: [1, H, W]}`` in ``[-1, 1]`` (conditions, and the target when present).
        params: ``{channel: {"lower", "upper"}}`` of the normalisation.
        meta: ``{"shape", "dtype"}`` of the stored images.
    """

    name: str
    files: dict[str, Path]
    images: dict[str, torch.Tensor]
    params: dict[str, dict[str, float]]
    meta: dict[str, Any]


class MicroscopyTaskData(RealDataTask):
    """Training tiles and evaluation fields of a folder of fluorescence fields, with the configured split.

    Args:
        dataset_dir: folder with the channel files.
        target: target channel.
        conditions: condition channels, anchor first.
        pattern: file-stem regex (see :func:`damm.tasks.microscopy_files.find_fields`).
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
        test_fields: field split with these fields as the test fields and every other field training (e.g. train
            on one field, evaluate the whole other field); ``None``: the split of ``split_mode``.

    Raises:
        ValueError: invalid settings.
    """

    task_name = "microscopy"
    generated_by = "damm.tasks (DAMM-Diffusion channel prediction)"
    unit = "field"

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
        test_fields: Sequence[str] | None = None,
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
        self.test_fields = None if test_fields is None else [str(f) for f in test_fields]
        if self.test_fields is not None:
            self.split_mode = "fields"
        self._fields: dict[str, dict[str, Any]] | None = None
        self._items = None

    # ------------------------------------------------------------------ 1. data preparation
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
        if self.test_fields is not None:
            unknown = sorted(set(self.test_fields) - set(found))
            if unknown or len(self.test_fields) >= len(found):
                raise ValueError(
                    f"task_test_fields {self.test_fields}: expected some (not all) of the fields {sorted(found)}"
                )
            for f in found:
                found[f]["split"] = "test" if f in self.test_fields else "training"
        elif self.resolved_split_mode(len(found)) == "fields":
            from ddcore.datalist import assign_splits

            split_of = assign_splits(sorted(found), self.val_fraction, self.test_fraction, self.seed)
            for f in found:
                found[f]["split"] = split_of[f]
        self._fields = found
        return found

    def inference_fields(self) -> dict[str, dict[str, Any]]:
        """Fields holding every condition channel; the target channel is optional (inference needs none).

        Returns:
            ``{field: {"files": {channel: Path}, "has_target": bool}}``.

        Raises:
            ValueError: no field has every condition channel.
        """
        found = {
            f: {"files": files, "has_target": self.target in files}
            for f, files in find_fields(self.dataset_dir, self.pattern).items()
            if all(k in files for k in self.conditions)
        }
        if not found:
            raise ValueError(f"{self.dataset_dir}: no field has the condition channels {self.conditions}")
        return found

    def units(self) -> dict[str, dict[str, Any]]:
        """The fields (:meth:`fields`)."""
        return self.fields()

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
        fields = self.inference_fields()
        if not any(info["has_target"] for info in fields.values()):  # inference only: check the conditions
            for name, info in fields.items():
                self.check_inputs(name, {k: info["files"][k] for k in self.conditions})
            logger.info(
                f"microscopy task: {len(fields)} field(s) without the target {self.target!r}: inference only "
                f"(from {self.conditions}); training needs fields holding every channel"
            )
            return {"inference only": len(fields)}
        for name, info in self.fields().items():
            self.check_inputs(name, {k: info["files"][k] for k in [*self.conditions, self.target]})  # anchor first
            split = info["split"] or "training+test (region split)"
            counts[split] = counts.get(split, 0) + 1
        logger.info(f"microscopy task: {counts}, target {self.target!r} from {self.conditions}")
        return counts

    def _boxes(self, name: str, info: Mapping[str, Any], h: int, w: int) -> list[tuple[str, int, int]]:
        """``(split, y, x)`` of the field's tiles: region split (training left, held-out right) or field split."""
        t = self.tile_size
        if h < t or w < t:
            raise ValueError(f"field {name!r} ({h}x{w}) is smaller than the tile size {t}")
        if self.resolved_split_mode() == "region":
            train_end, test_start = self.heldout_columns(w)
            boxes = [
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
            return boxes
        split = info["split"]
        if split == "test":
            return []
        step = self.stride if split == "training" else t
        return [(split, y, x) for y in tile_positions(h, t, step) for x in tile_positions(w, t, step)]

    def prepare_items(self) -> dict[str, list[dict[str, Any]]]:
        """Tiles of every split, and the target's intensity reference (training fields / training regions).

        Returns:
            ``{split: [{"id", "field", "y", "x", <channel>: [1, t, t]}]}`` (validation = held-out tiles under the
            region split; used for monitoring only).

        Raises:
            ValueError: bad fields or no training tile.
        """
        self.check()
        region = self.resolved_split_mode() == "region"
        tiles: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
        ref = []
        t = self.tile_size
        for name, info in self.fields().items():
            images, params, meta = load_field(info["files"], self.modalities, self.lower, self.upper)
            if region or info["split"] == "training":
                ref.append(params[self.target])
            for split, y, x in self._boxes(name, info, *meta["shape"]):
                rec: dict[str, Any] = {"id": f"{name}_y{y:05d}_x{x:05d}", "field": name, "y": y, "x": x}
                for k in self.modalities:
                    rec[k] = images[k][:, y : y + t, x : x + t].clone()
                tiles[split].append(rec)
                if region and split == "test":
                    tiles["validation"].append(rec)
        if not tiles["training"]:
            raise ValueError("microscopy task: no training tile")
        if not tiles["validation"]:  # no validation field: the autoencoder's validation monitors training tiles
            tiles["validation"] = tiles["training"][:: max(1, len(tiles["training"]) // 16)]
        if self.reference_path is not None and ref:
            write_intensity_reference(self.reference_path, self.target, ref)
        logger.info("microscopy task tiles: " + ", ".join(f"{k}={len(v)}" for k, v in tiles.items()))
        return tiles

    # ------------------------------------------------------------------ 2. prediction and 3. writing
    def check_inputs(self, name: str, files: Mapping[str, Path]) -> None:
        """The field's channels are readable 2D images of one size (names the field and the files)."""
        try:
            check_same_size({k: read_channel(p) for k, p in files.items()}, files)
        except ValueError as err:
            raise ValueError(f"field {name!r}: {err}") from err

    def prepare(self, files: Mapping[str, str | Path], name: str) -> PreparedField:
        """:func:`load_field` of the conditions (and the target when ``files`` holds it)."""
        keys = [*self.conditions, *([self.target] if self.target in files else [])]
        images, params, meta = load_field(files, keys, self.lower, self.upper)
        return PreparedField(name, {k: Path(v) for k, v in files.items()}, images, params, meta)

    def target_intensity(self, prepared: PreparedField) -> dict[str, float] | None:
        """The field's own target range (``None`` without its target)."""
        return prepared.params.get(self.target)

    def predict(
        self,
        prepared: PreparedField,
        predictor: Callable[[torch.Tensor], torch.Tensor],
        intensity: Mapping[str, float],
        use_target: bool = False,
        overlap: float = 0.25,
        sw_batch_size: int = 16,
        **options: Any,
    ) -> np.ndarray:
        """:func:`predict_field` over the whole (prepared) field (clamped to ``[-1, 1]``), mapped to the input scale
        and dtype: within ``[lower, upper]`` (for an integer dtype, the integers within it)."""
        keys = [self.target] if use_target else self.conditions
        pred = predict_field(predictor, [prepared.images[k] for k in keys], self.tile_size, overlap, sw_batch_size)
        out = to_input_scale(pred[0], intensity, prepared.meta["dtype"])
        lo, hi = float(intensity["lower"]), float(intensity["upper"])
        if np.issubdtype(out.dtype, np.integer):
            info = np.iinfo(out.dtype)
            if np.ceil(lo) <= np.floor(hi):  # rounding must not step out of the stated range
                lo, hi = np.ceil(lo), np.floor(hi)
            lo, hi = min(max(lo, info.min), info.max), min(max(hi, info.min), info.max)
        return np.clip(out, np.asarray(lo).astype(out.dtype), np.asarray(hi).astype(out.dtype))

    def write(self, array: np.ndarray, prepared: PreparedField, path: str | Path) -> Path:
        """TIFF of the input size and dtype."""
        return write_tiff(array, path)

    def sidecar_settings(self, overlap: float = 0.25, **options: Any) -> dict[str, Any]:
        """Tile size and window overlap."""
        return {"tile_size": self.tile_size, "overlap": overlap}

    def ceiling_batch_size(self, inferer: Any, sw_batch_size: int = 16, **options: Any) -> int:
        """The sliding window's batch size."""
        return int(sw_batch_size)

    # ------------------------------------------------------------------ 4. evaluation
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

    def evaluation_cases(self) -> Iterator[EvaluationCase]:
        """Every evaluated field, restricted to its held-out columns plus half a tile of context (the rest was seen
        in training).

        Yields:
            One :class:`~damm.tasks.protocol.EvaluationCase` per field.
        """
        for name, files, x0 in self.evaluation_fields():
            prep = self.prepare(files, name)
            start = 0 if x0 is None else max(0, x0 - self.tile_size // 2)
            prep.images = {k: v[:, :, start:] for k, v in prep.images.items()}
            tp = prep.params[self.target]
            truth = to_unit(read_channel(files[self.target])[:, start:].astype(np.float32), tp["lower"], tp["upper"])
            mask = torch.zeros_like(truth, dtype=torch.bool)
            mask[:, 0 if x0 is None else x0 - start :] = True
            yield EvaluationCase(
                name=name,
                files=dict(files),
                prepared=prep,
                truth=truth,
                regions={"heldout" if x0 is not None else "field": mask},  # whole field under the field split
                intensity=tp,
                output=f"{name.replace('/', '_')}/{{method}}_{self.target}_x{start}.tif",
                axis=None,
                record={"eval_columns": [x0, prep.meta["shape"][1]]},
            )

    def evaluation_settings(self, overlap: float = 0.25, **options: Any) -> dict[str, Any]:
        """Split, held-out fraction, gap, tile size and overlap."""
        return {
            "split_mode": self.resolved_split_mode(),
            "heldout_fraction": self.heldout_fraction,
            "gap": self.gap,
            "tile_size": self.tile_size,
            "overlap": overlap,
        }

    def metric_space(self, ssim_win_size: int) -> str:
        """Held-out columns, the target field's percentile range."""
        return (
            f"held-out columns, both images mapped to [0, 1] with the target field's [p{self.lower}, "
            f"p{self.upper}] range; PSNR max 1; SSIM Gaussian window {ssim_win_size}"
        )

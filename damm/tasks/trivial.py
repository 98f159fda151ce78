"""Trivial baselines: each source (condition) modality mapped to the target's intensities.

What a user compares a synthesis model with first: "copy" one of the sources, with its intensities mapped onto the
target's, the mapping fitted on the task's training items only (the same slices / tiles the other models see,
in the normalised ``[-1, 1]`` space). Two mappings per condition:

- **linear**: ``target ≈ a · source + b``, a Huber regression fitted by iteratively reweighted least squares
  (start: ordinary least squares; Huber threshold ``1.345 σ`` with ``σ = 1.4826 · MAD`` of the residuals;
  :data:`HUBER_ITERATIONS` reweightings), so a few badly matched pixels (tumour, vessels) do not tilt the line;
- **histogram**: quantile mapping, the source's :data:`N_QUANTILES` quantiles onto the target's (monotone,
  piecewise linear, ``np.interp`` at apply time; flat beyond the outermost quantiles).

The pixels fitted are chosen by ``foreground``: ``"nonbackground"`` (source and target both above
``-1 + 1e-6``: outside the brain / padding the normalised images are exactly ``-1``) or ``"all"`` (microscopy:
the whole tile is image). In ``"nonbackground"`` mode, background source pixels stay ``-1`` in the prediction.

The fitted parameters are one JSON file (:func:`fit_trivial_baselines`, bundle run id ``fit_trivial`` through
:func:`fit_trivial_stage`); :class:`TrivialPredictor` has the predictor interface of :mod:`damm.tasks.common`
(``[B, n_cond, H, W] -> [B, 1, H, W]`` in ``[-1, 1]``), so whole-volume / whole-field inference and the evaluation
run it exactly like the diffusion model and the UNet baseline; :func:`trivial_predictors` builds them all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddcore.atomic import atomic_write_json

__all__ = [
    "BACKGROUND",
    "FOREGROUND_MODES",
    "HUBER_ITERATIONS",
    "KINDS",
    "N_QUANTILES",
    "TrivialPredictor",
    "fit_histogram",
    "fit_linear",
    "fit_trivial_baselines",
    "fit_trivial_stage",
    "load_trivial_baselines",
    "trivial_predictors",
]

logger = logging.getLogger(__name__)

#: normalised values at or below this are background (the images are exactly ``-1`` there).
BACKGROUND = -1.0 + 1e-6
#: the ``foreground`` settings.
FOREGROUND_MODES = ("nonbackground", "all")
#: the mappings fitted per condition.
KINDS = ("linear", "histogram")
#: quantiles of the histogram mapping (0 %, 1/256, ..., 100 %).
N_QUANTILES = 257
#: IRLS reweightings of the Huber line.
HUBER_ITERATIONS = 20
#: Huber threshold in units of the robust residual scale (95 % efficiency for Gaussian residuals).
HUBER_K = 1.345


def fit_linear(source: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Huber line ``target ≈ a · source + b`` (iteratively reweighted least squares, see the module docstring).

    Args:
        source: 1D source values.
        target: 1D target values, same length.

    Returns:
        ``{"a", "b"}`` (``a = 0``, ``b`` = the target's median when the source is constant).
    """
    s, t = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if np.ptp(s) == 0:
        return {"a": 0.0, "b": float(np.median(t))}
    design = np.stack([s, np.ones_like(s)], axis=1)
    w = np.ones_like(s)
    coef = np.zeros(2)
    for _ in range(HUBER_ITERATIONS):
        sw = np.sqrt(w)
        new = np.linalg.lstsq(design * sw[:, None], t * sw, rcond=None)[0]
        done = np.allclose(new, coef, rtol=0.0, atol=1e-12)
        coef = new
        res = t - design @ coef
        scale = 1.4826 * float(np.median(np.abs(res - np.median(res))))
        if done or scale <= 1e-12:  # converged, or (nearly) every pixel on the line
            break
        thr = HUBER_K * scale
        w = np.minimum(1.0, thr / np.maximum(np.abs(res), 1e-300))
    return {"a": float(coef[0]), "b": float(coef[1])}


def fit_histogram(source: np.ndarray, target: np.ndarray, n_quantiles: int = N_QUANTILES) -> dict[str, list[float]]:
    """Quantile mapping: the ``n_quantiles`` evenly spaced quantiles of the source and of the target.

    Args:
        source: 1D source values.
        target: 1D target values (any length).
        n_quantiles: number of quantiles (the 0 % and 100 % ones included).

    Returns:
        ``{"source_quantiles", "target_quantiles"}`` (non-decreasing lists).
    """
    p = np.linspace(0.0, 1.0, int(n_quantiles))
    return {
        "source_quantiles": [float(v) for v in np.quantile(np.asarray(source, dtype=np.float64), p)],
        "target_quantiles": [float(v) for v in np.quantile(np.asarray(target, dtype=np.float64), p)],
    }


def _check_foreground(foreground: str) -> str:
    if foreground not in FOREGROUND_MODES:
        raise ValueError(f"trivial baselines: foreground must be one of {list(FOREGROUND_MODES)}, got {foreground!r}")
    return foreground


def fit_trivial_baselines(
    items: Sequence[Mapping[str, Any]],
    conditions: Sequence[str],
    target: str,
    path: str | Path,
    foreground: str = "nonbackground",
) -> dict[str, Any]:
    """Fit the linear and histogram mapping of every condition onto the target; write them as JSON atomically.

    Args:
        items: training items (dicts with a ``[1, H, W]`` tensor per modality, in ``[-1, 1]``).
        conditions: condition keys (anchor first).
        target: target key.
        path: JSON destination (``models/trivial_baselines.json``).
        foreground: ``"nonbackground"`` or ``"all"`` (see the module docstring).

    Returns:
        The written parameters: ``{"target", "conditions", "foreground", "mappings": {condition: {"linear": {"a",
        "b"}, "histogram": {"source_quantiles", "target_quantiles"}, "n_pixels"}}, ...}``.

    Raises:
        ValueError: no items, a missing key, an unknown ``foreground``, or a condition without foreground pixel.
    """
    _check_foreground(foreground)
    if not items:
        raise ValueError(f"fit_trivial_baselines: no training items to fit {list(conditions)} -> {target!r} on")
    missing = [k for k in [target, *conditions] if k not in items[0]]
    if missing:
        raise ValueError(f"fit_trivial_baselines: items lack {missing}; keys {sorted(items[0])}")

    def flat(key: str) -> np.ndarray:
        return np.concatenate([np.asarray(torch.as_tensor(it[key]).float()).ravel() for it in items])

    y = flat(target)
    mappings: dict[str, Any] = {}
    for cond in conditions:
        x = flat(cond)
        if x.shape != y.shape:
            raise ValueError(f"fit_trivial_baselines: {cond!r} and {target!r} items differ in size")
        keep = (x > BACKGROUND) & (y > BACKGROUND) if foreground == "nonbackground" else np.ones(x.shape, bool)
        if not keep.any():
            raise ValueError(f"fit_trivial_baselines: no foreground pixel where {cond!r} and {target!r} are > -1")
        xs, ys = x[keep], y[keep]
        mappings[cond] = {"linear": fit_linear(xs, ys), "histogram": fit_histogram(xs, ys), "n_pixels": int(xs.size)}
        lin = mappings[cond]["linear"]
        logger.info(f"trivial baselines: {cond} -> {target}: a={lin['a']:.4f}, b={lin['b']:.4f} on {xs.size} pixels")
    params = {
        "description": "trivial baselines: each condition mapped to the target's intensities in the normalised "
        "[-1, 1] space, fitted on the training items only",
        "target": target,
        "conditions": list(conditions),
        "foreground": foreground,
        "linear_fit": f"Huber regression (IRLS from least squares, threshold {HUBER_K} x 1.4826 MAD)",
        "n_quantiles": N_QUANTILES,
        "n_items": len(items),
        "mappings": mappings,
    }
    atomic_write_json(params, path)
    return params


def load_trivial_baselines(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`fit_trivial_baselines`.

    Args:
        path: the JSON file.

    Returns:
        The parameters.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a trivial-baselines file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trivial baselines '{path}' not found")
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"trivial baselines {path}: cannot read it ({type(err).__name__}: {err})") from err
    keys = ("target", "conditions", "foreground", "mappings")
    missing = [k for k in keys if k not in params] if isinstance(params, dict) else list(keys)
    if missing:
        raise ValueError(f"trivial baselines {path}: not a file written by fit_trivial_baselines (lacks {missing})")
    return params


class TrivialPredictor:
    """One condition mapped to the target: ``[B, n_cond, H, W] -> [B, 1, H, W]`` in ``[-1, 1]`` (clamped).

    Args:
        params: what :func:`fit_trivial_baselines` returned (or :func:`load_trivial_baselines` read).
        condition_index: which channel of the input (index into ``params["conditions"]``, the input's order).
        kind: ``"linear"`` or ``"histogram"``.

    Raises:
        ValueError: unknown kind or condition index.
    """

    def __init__(self, params: Mapping[str, Any], condition_index: int, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"TrivialPredictor: kind must be one of {list(KINDS)}, got {kind!r}")
        conditions = list(params["conditions"])
        if not 0 <= int(condition_index) < len(conditions):
            raise ValueError(f"TrivialPredictor: condition_index {condition_index} outside {conditions}")
        self.index = int(condition_index)
        self.condition = conditions[self.index]
        self.kind = kind
        self.foreground = _check_foreground(str(params["foreground"]))
        rec = params["mappings"][self.condition]
        if kind == "linear":
            self.a, self.b = float(rec["linear"]["a"]), float(rec["linear"]["b"])
        else:
            src = np.asarray(rec["histogram"]["source_quantiles"], dtype=np.float64)
            tgt = np.asarray(rec["histogram"]["target_quantiles"], dtype=np.float64)
            # np.interp needs strictly increasing abscissae: tied source quantiles take their targets' mean
            self.xp, inverse = np.unique(src, return_inverse=True)
            self.fp = np.bincount(inverse, weights=tgt) / np.bincount(inverse)

    @property
    def name(self) -> str:
        """``copy_<condition>_<kind>``."""
        return f"copy_{self.condition}_{self.kind}"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Map the condition channel.

        Args:
            x: ``[B, n_cond, H, W]`` stacked conditions in ``[-1, 1]``.

        Returns:
            ``[B, 1, H, W]`` float32 on ``x``'s device.
        """
        src = x[:, self.index : self.index + 1].float()
        if self.kind == "linear":
            out = self.a * src + self.b
        else:
            mapped = np.interp(src.detach().cpu().double().numpy(), self.xp, self.fp)
            out = torch.as_tensor(mapped, dtype=torch.float32).to(x.device)
        out = out.clamp(-1.0, 1.0)
        if self.foreground == "nonbackground":
            out = torch.where(src <= BACKGROUND, torch.full_like(out, -1.0), out)
        return out


def trivial_predictors(
    path: str | Path | None,
    conditions: Sequence[str],
    kinds: Sequence[str] = KINDS,
    target: str | None = None,
) -> dict[str, TrivialPredictor]:
    """``{"copy_<condition>_<kind>": predictor}`` for every condition and kind when the file exists, else ``{}``.

    Args:
        path: the JSON written by :func:`fit_trivial_baselines` (``None`` or missing: no trivial baselines).
        conditions: the task's conditions, in the order the predictors receive them.
        kinds: mappings to build.
        target: the task's target (checked against the file when given).

    Returns:
        The predictors to evaluate beside DAMM.

    Raises:
        ValueError: the file was fitted for other conditions or another target.
    """
    if path is None or not Path(path).is_file():
        return {}
    params = load_trivial_baselines(path)
    if list(params["conditions"]) != list(conditions):
        raise ValueError(
            f"trivial baselines {path} were fitted for conditions {params['conditions']}, not {list(conditions)}; "
            "fit them again (run fit_trivial with refit_trivial true)"
        )
    if target is not None and params.get("target") != target:
        raise ValueError(f"trivial baselines {path} map to {params.get('target')!r}, not {target!r}; fit them again")
    preds = [TrivialPredictor(params, i, kind) for kind in kinds for i in range(len(conditions))]
    return {p.name: p for p in sorted(preds, key=lambda p: (p.index, KINDS.index(p.kind)))}


def fit_trivial_stage(
    items: Sequence[Mapping[str, Any]],
    conditions: Sequence[str],
    target: str,
    path: str | Path,
    refit: bool = False,
    foreground: str | None = None,
) -> Path:
    """Bundle run id ``fit_trivial``: fit the trivial baselines on the training items and save them (skip if done).

    Args:
        items: training items.
        conditions: condition keys.
        target: target key.
        path: JSON destination (``models/trivial_baselines.json``).
        refit: fit even if ``path`` exists.
        foreground: ``"nonbackground"`` or ``"all"`` (``None``: ``"nonbackground"``).

    Returns:
        ``path``.
    """
    path = Path(path)
    if path.is_file() and not refit:
        logger.info(f"trivial baselines: {path} exists; skipping (set refit to fit again)")
        return path
    fit_trivial_baselines(items, conditions, target, path, foreground or "nonbackground")
    logger.info(f"trivial baselines written to {path}")
    return path

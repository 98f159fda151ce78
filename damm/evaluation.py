"""Honest evaluation of a trained DAMM-Diffusion model on a held-out split.

For the gated prediction (``damm``), each branch alone (``uni``, ``multi``) and the mean of ``K`` gated samples,
the PSNR, SSIM and MAE (``monai.metrics``, on images mapped to ``[0, 1]``, data range 1) are computed per item and
averaged overall and, when the datalist flags them, separately over consistent and divergent items. The target
autoencoder's reconstruction (the ceiling no synthesis can beat) is reported beside them, and DDIM-N is compared
with DDPM-1000 on a subset. Written as JSON, a markdown table and a PNG montage
(conditions | target | damm | uni | multi | confidence; consistent and divergent rows).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric

from damm.engines.autoencoder_trainer import to_unit_range
from damm.inferers import DAMMInferer
from ddcore.atomic import atomic_path, atomic_write_json, atomic_write_text, remove_stale_temporaries
from ddcore.device import is_rank_zero
from ddcore.precision import autocast

__all__ = [
    "SUBSETS",
    "evaluate_model",
    "format_table",
    "load_items",
    "per_item_metrics",
    "run_evaluation",
    "summarise",
    "write_montage",
]

logger = logging.getLogger(__name__)

SUBSETS = ("all", "consistent", "divergent")
METRICS = ("psnr", "ssim", "mae")


def per_item_metrics(
    prediction: torch.Tensor, target: torch.Tensor, spatial_dims: int = 2, ssim_win_size: int = 11
) -> dict[str, np.ndarray]:
    """PSNR, SSIM and MAE per item of two ``[-1, 1]`` batches (compared in ``[0, 1]``).

    Args:
        prediction: ``[N, C, *spatial]``.
        target: same shape.
        spatial_dims: 2 or 3.
        ssim_win_size: Gaussian SSIM window.

    Returns:
        ``{"psnr": [N], "ssim": [N], "mae": [N]}``.
    """
    p, t = to_unit_range(prediction.float()), to_unit_range(target.float())
    out = {}
    for name, metric in (
        ("psnr", PSNRMetric(max_val=1.0, reduction="none")),
        ("ssim", SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, win_size=ssim_win_size, reduction="none")),
        ("mae", MAEMetric(reduction="none")),
    ):
        values = metric(y_pred=p, y=t)
        out[name] = torch.as_tensor(values).reshape(p.shape[0], -1).mean(dim=1).cpu().numpy().astype(np.float64)
    return out


def summarise(values: Mapping[str, np.ndarray], divergent: np.ndarray | None) -> dict[str, dict[str, Any]]:
    """Mean (and standard deviation) of each metric overall and per subset.

    Args:
        values: per-item metric arrays.
        divergent: per-item flags, or ``None`` when the datalist has none.

    Returns:
        ``{subset: {"n": int, "<metric>": mean, "<metric>_std": std}}``.
    """
    n = len(next(iter(values.values())))
    masks = {"all": np.ones(n, dtype=bool)}
    if divergent is not None:
        masks["consistent"] = ~divergent
        masks["divergent"] = divergent
    summary: dict[str, dict[str, Any]] = {}
    for subset, mask in masks.items():
        rec: dict[str, Any] = {"n": int(mask.sum())}
        for name, v in values.items():
            sel = np.asarray(v)[mask]
            rec[name] = float(sel.mean()) if sel.size else float("nan")
            rec[f"{name}_std"] = float(sel.std()) if sel.size else float("nan")
        summary[subset] = rec
    return summary


def load_items(
    items: Sequence[Mapping[str, Any]], transform: Callable, keys: Sequence[str]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run the image pipeline on every item and stack the results per modality.

    Args:
        items: datalist items.
        transform: image pipeline (deterministic).
        keys: modalities.

    Returns:
        ``({modality: [N, C, *spatial]}, [item info (id, divergent, files)])``.
    """
    stacks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    info = []
    for item in items:
        data = transform(dict(item))
        for k in keys:
            x = data[k]
            stacks[k].append(x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x))
        info.append(
            {
                "id": str(item.get("id", len(info))),
                "divergent": bool(item.get("divergent", False)),
                "files": {k: str(item[k]) for k in keys},
            }
        )
    return {k: torch.stack(v).float() for k, v in stacks.items()}, info


def _ceiling(model: Any, images: torch.Tensor, batch_size: int, precision: str = "fp32") -> torch.Tensor:
    ae = model.autoencoders[model.target]
    device = next(ae.parameters()).device
    outs = []
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(device)
            with autocast(precision, device):  # the same precision as the sampler's encode/decode
                recon = ae.decode(ae.encode(x))
            outs.append(recon.float().cpu())
    return torch.cat(outs)


def evaluate_model(
    model: Any,
    inferer: DAMMInferer,
    images: Mapping[str, torch.Tensor],
    info: Sequence[Mapping[str, Any]],
    branches: Sequence[str] = ("damm", "uni", "multi"),
    num_samples: int = 4,
    ddpm_items: int = 0,
    spatial_dims: int = 2,
    ssim_win_size: int = 11,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Evaluate every method on stacked images.

    Args:
        model: :class:`damm.model.DAMMModel`.
        inferer: the configured sampler (its sampler/steps/seed are used; ``branch``/``num_samples`` replaced).
        images: ``{modality: [N, C, *spatial]}`` in ``[-1, 1]``.
        info: per-item ``id``/``divergent``.
        branches: branches to evaluate.
        num_samples: K for the ``damm`` K-sample mean (``<= 1`` skips it).
        ddpm_items: compare DDIM with DDPM-1000 (gated branch) on the first this-many items (0 skips).
        spatial_dims: 2 or 3.
        ssim_win_size: SSIM window.

    Returns:
        ``(results, predictions)``: the JSON-ready results and ``{method: [N, C, *spatial]}`` predictions (plus
        ``"confidence"`` maps of the gated run) for the montage.
    """
    target = images[model.target]
    conditions = [images[k] for k in model.conditions]
    divergent = np.array([bool(i["divergent"]) for i in info])
    has_flag = any("divergent" in i for i in info) and divergent.any() and (~divergent).any()
    flags = divergent if has_flag else None
    methods: dict[str, Any] = {}
    predictions: dict[str, torch.Tensor] = {}
    bs = inferer.batch_size or 64

    t0 = time.perf_counter()
    recon = _ceiling(model, target, bs, getattr(inferer, "precision", "fp32"))
    methods["autoencoder_ceiling"] = {
        "description": f"{model.target} autoencoder reconstruction (upper bound)",
        "seconds": time.perf_counter() - t0,
        **summarise(per_item_metrics(recon, target, spatial_dims, ssim_win_size), flags),
    }
    sampler_name = f"{inferer.sampler.upper()}-{inferer.num_inference_steps}"
    for branch in branches:
        inf = inferer.replace(branch=branch, num_samples=1)
        t0 = time.perf_counter()
        res = inf.sample(conditions, model)
        secs = time.perf_counter() - t0
        vals = per_item_metrics(res.prediction, target, spatial_dims, ssim_win_size)
        rec = {"description": f"{branch} ({sampler_name})", "seconds": secs, **summarise(vals, flags)}
        if branch == "damm" and res.gate_choices is not None:
            gate = res.gate_choices.float().mean(dim=(1, 2)).numpy()
            rec["gated_multi_fraction"] = summarise({"f": gate}, flags)
            rec["gated_multi_fraction"] = {s: v["f"] for s, v in rec["gated_multi_fraction"].items()}
        if branch == "damm" and res.sample_choices is not None:  # the gate's decision per sample, by subset
            per = summarise({"f": res.sample_choices.float().mean(dim=1).numpy()}, flags)
            rec["multi_sample_fraction"] = {s: v["f"] for s, v in per.items()}
        methods[branch] = rec
        predictions[branch] = res.prediction
        if branch == "damm" and res.confidence_map is not None:
            predictions["confidence"] = res.confidence_map
        methods[branch]["per_item"] = {m: [round(float(v), 5) for v in vals[m]] for m in METRICS}
    if num_samples and num_samples > 1:
        inf = inferer.replace(branch="damm", num_samples=int(num_samples))
        t0 = time.perf_counter()
        res = inf.sample(conditions, model)
        vals = per_item_metrics(res.prediction, target, spatial_dims, ssim_win_size)
        methods[f"damm_mean{num_samples}"] = {
            "description": f"mean of {num_samples} gated samples ({sampler_name})",
            "seconds": time.perf_counter() - t0,
            "pixel_std_mean": float(res.std.mean()),
            **summarise(vals, flags),
        }
        predictions[f"damm_mean{num_samples}"] = res.prediction
    if ddpm_items and ddpm_items > 0:
        m = min(int(ddpm_items), target.shape[0])
        sub_flags = flags[:m] if flags is not None and flags[:m].any() and (~flags[:m]).any() else None
        for name, inf in (
            (f"damm_{sampler_name.lower()}_subset", inferer.replace(branch="damm", num_samples=1)),
            ("damm_ddpm-1000_subset", inferer.replace(branch="damm", num_samples=1, sampler="ddpm")),
        ):
            t0 = time.perf_counter()
            res = inf.sample([c[:m] for c in conditions], model)
            vals = per_item_metrics(res.prediction, target[:m], spatial_dims, ssim_win_size)
            methods[name] = {
                "description": f"gated, {inf.sampler.upper()}-{inf.num_inference_steps}, first {m} items",
                "seconds": time.perf_counter() - t0,
                **summarise(vals, sub_flags),
            }
    results: dict[str, Any] = {
        "n_items": int(target.shape[0]),
        "n_divergent": int(divergent.sum()) if has_flag else None,
        "metric_space": "images mapped from [-1, 1] to [0, 1]; PSNR max 1, SSIM data range 1 (Gaussian window "
        f"{ssim_win_size}), MAE",
        "sampler": inferer.settings(),
        "methods": methods,
        "claim": _claim(methods, flags is not None),
    }
    return results, predictions


def _claim(methods: Mapping[str, Any], split: bool) -> dict[str, Any]:
    """Does the gated prediction match or beat the better single branch on each subset?"""
    if not all(b in methods for b in ("damm", "uni", "multi")):
        return {}
    out: dict[str, Any] = {}
    for subset in SUBSETS if split else ("all",):
        rec = {}
        for metric in ("psnr", "ssim"):
            best = max(methods["uni"][subset][metric], methods["multi"][subset][metric])
            delta = methods["damm"][subset][metric] - best
            rec[metric] = {"damm_minus_best_branch": delta, "holds": bool(delta >= 0)}
        out[subset] = rec
    return out


def format_table(results: Mapping[str, Any]) -> str:
    """Markdown table of the evaluation results.

    Args:
        results: output of :func:`evaluate_model`.

    Returns:
        The table (with a short header line).
    """
    methods = results["methods"]
    split = "consistent" in next(iter(methods.values()))
    subsets = SUBSETS if split else ("all",)
    head = ["method"]
    for metric in ("PSNR", "SSIM", "MAE"):
        head += [f"{metric} {s}" if split else metric for s in subsets]
    head += ["steps gated to multi (cons/div)" if split else "steps gated to multi"]
    head += ["samples gated to multi (cons/div)" if split else "samples gated to multi", "time s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rec in methods.items():
        row = [name]
        for metric, fmt in (("psnr", "{:.2f}"), ("ssim", "{:.4f}"), ("mae", "{:.4f}")):
            row += [fmt.format(rec[s][metric]) if s in rec else "" for s in subsets]
        for g in (rec.get("gated_multi_fraction"), rec.get("multi_sample_fraction")):
            if g is None:
                row.append("")
            elif split:
                row.append(f"{g['consistent']:.2f} / {g['divergent']:.2f}")
            else:
                row.append(f"{g['all']:.2f}")
        row.append(f"{rec['seconds']:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    n = results["n_items"]
    nd = results.get("n_divergent")
    intro = f"Test items: {n}" + (f" ({nd} divergent)" if nd is not None else "") + f". {results['metric_space']}."
    claim = results.get("claim") or {}
    notes = []
    for subset, rec in claim.items():
        d = rec["psnr"]["damm_minus_best_branch"]
        notes.append(
            f"{subset}: damm - best branch = {d:+.2f} dB PSNR, {rec['ssim']['damm_minus_best_branch']:+.4f} SSIM"
        )
    text = intro + "\n\n" + "\n".join(lines) + "\n"
    if notes:
        text += "\nGated vs better single branch: " + "; ".join(notes) + ".\n"
    return text


def _to_uint8(x: torch.Tensor, unit: bool = False) -> np.ndarray:
    a = x.float() if unit else to_unit_range(x.float())
    a = a.clamp(0, 1)
    if a.ndim == 4:  # 3D: middle slice of the last axis
        a = a[..., a.shape[-1] // 2]
    return (a[0].cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def write_montage(
    path: str | Path,
    images: Mapping[str, torch.Tensor],
    predictions: Mapping[str, torch.Tensor],
    info: Sequence[Mapping[str, Any]],
    conditions: Sequence[str],
    target: str,
    rows_per_group: int = 3,
    scale: int = 2,
) -> Path:
    """PNG montage: conditions | target | damm | uni | multi | confidence, consistent then divergent rows.

    Args:
        path: destination PNG.
        images: ``{modality: [N, C, *spatial]}`` in ``[-1, 1]``.
        predictions: ``{"damm"|"uni"|"multi": [N, ...], "confidence": [N, 1, *spatial] in [0, 1]}``.
        info: per-item ``id``/``divergent``.
        conditions: condition modalities (columns, anchor first).
        target: target modality.
        rows_per_group: rows per subset.
        scale: integer up-scaling of each tile.

    Returns:
        ``path``.
    """
    from PIL import Image, ImageDraw

    columns = [*conditions, target] + [b for b in ("damm", "uni", "multi") if b in predictions]
    has_conf = "confidence" in predictions
    if has_conf:
        columns.append("confidence")
    divergent = [bool(i["divergent"]) for i in info]
    groups = [("consistent", [i for i, d in enumerate(divergent) if not d][:rows_per_group])]
    if any(divergent):
        groups.append(("divergent", [i for i, d in enumerate(divergent) if d][:rows_per_group]))
    rows = [(g, i) for g, idx in groups for i in idx]
    first = images[target][0]
    h, w = (int(s) * scale for s in first.shape[1:3])
    label_w, head_h, pad = 120, 18, 4
    canvas = Image.new("L", (label_w + len(columns) * (w + pad), head_h + len(rows) * (h + pad)), color=255)
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((label_w + c * (w + pad) + 2, 3), name, fill=0)
    for r, (group, i) in enumerate(rows):
        y = head_h + r * (h + pad)
        draw.text((4, y + 4), f"{info[i]['id']}", fill=0)
        draw.text((4, y + 18), group, fill=0)
        for c, name in enumerate(columns):
            if name in images:
                tile = _to_uint8(images[name][i])
            elif name == "confidence":
                tile = _to_uint8(predictions["confidence"][i], unit=True)
            else:
                tile = _to_uint8(predictions[name][i])
            img = Image.fromarray(tile).resize((w, h), Image.NEAREST)
            canvas.paste(img, (label_w + c * (w + pad), y))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(str(tmp), format="PNG")
    return path


def run_evaluation(
    model: Any,
    inferer: DAMMInferer,
    items: Sequence[Mapping[str, Any]],
    transform: Callable,
    output_dir: str | Path,
    ddpm_items: int,
    model_path: str | Path | None = None,
    branches: Sequence[str] = ("damm", "uni", "multi"),
    num_samples: int = 4,
    spatial_dims: int = 2,
    ssim_win_size: int = 11,
    montage_rows: int = 3,
    print_table: bool = True,
) -> dict[str, Any] | None:
    """Load the trained model (optionally), evaluate it on ``items``, write JSON, markdown and montage.

    Only rank 0 evaluates under ``torch.distributed``; the others return ``None``.

    Args:
        model: :class:`damm.model.DAMMModel`.
        inferer: configured sampler.
        items: held-out datalist items (target and conditions).
        transform: deterministic image pipeline.
        output_dir: where ``evaluation.json``, ``evaluation.md`` and ``montage.png`` go.
        ddpm_items: items for the DDIM-vs-DDPM-1000 comparison (0 skips).
        model_path: ``models/model.pt`` to load first (``None``: use ``model`` as is).
        branches: branches to evaluate.
        num_samples: K of the K-sample mean.
        spatial_dims: 2 or 3.
        ssim_win_size: SSIM window.
        montage_rows: montage rows per subset.
        print_table: print the markdown table to stdout.

    Returns:
        The results dict (rank 0) or ``None``.
    """
    from damm.distributed import barrier
    from damm.model import load_model

    if not is_rank_zero():
        barrier()
        return None
    if model_path is not None:
        load_model(model, model_path)
    keys = [model.target, *model.conditions]
    remove_stale_temporaries(output_dir)  # a killed evaluation's half-written report or montage
    t0 = time.perf_counter()
    images, info = load_items(items, transform, keys)
    results, predictions = evaluate_model(
        model, inferer, images, info, branches, num_samples, ddpm_items, spatial_dims, ssim_win_size
    )
    results["seconds_total"] = time.perf_counter() - t0
    results["items"] = [{"id": i["id"], "divergent": i["divergent"]} for i in info]
    output_dir = Path(output_dir)
    atomic_write_json(results, output_dir / "evaluation.json")
    table = format_table(results)
    atomic_write_text(table, output_dir / "evaluation.md")
    montage = write_montage(
        output_dir / "montage.png", images, predictions, info, model.conditions, model.target, montage_rows
    )
    if print_table:
        print("\n" + table, flush=True)
    logger.info(f"evaluation written to {output_dir} (evaluation.json, evaluation.md, {montage.name})")
    barrier()
    return results

"""DAMM-Diffusion sampling cost and quality, K-sample averaging and confidence separation (issue 8 §3 and §5).

On the default DAMM model trained on the default synthetic data (the bundle's ``train.json`` defaults, its default
``confidence_source``), with the capped test split and one seed:

1. **Samplers**: DDPM-1000 (the paper), DDIM-{10, 25, 50, 100} (the config's ``eta``), DPM-Solver++(2M)-{5, 10, 15,
   20, 25} and PNDM (PLMS)-{10, 25, 50} (deterministic; :mod:`damm.schedulers`) on the same inputs and seed (same
   initial noise): seconds per image (all inputs in one batch), PSNR/SSIM of the gated (``damm``) prediction and their
   difference to DDPM-1000 (the reference of every other figure, so the report shows the ratio). The plots put them
   against the denoiser evaluations per sample (the steps; PNDM-N evaluates N + 1 times).
2. **K-sample averaging** with DDIM-50: K = 1, 4, 8 samples per input, the prediction being their mean: seconds per
   image, PSNR/SSIM, PSNR gain over K = 1.
3. **Confidence separation**: each branch alone (``uni``, ``multi``; DDIM-50, same seed); a tile is "multi better"
   when PSNR(multi) > PSNR(uni). The score is the gated run's confidence ``c`` averaged over the sampling steps;
   reported: AUROC of ``c`` for "multi better", AUROC of ``1 - c`` for the datalist's ``divergent`` flag (``c``
   should be low on divergent tiles), the class counts and the mean ``c`` per class.

The model is the one cached by :mod:`benchmarks.damm_quality` (``benchmarks/results/tmp_damm_quality/
diffusion_<source>``); when it is absent it is trained there the same way (which takes long). ``quick=True``
trains a toy model in a temporary folder (well under a minute in all). Run alone with
``python -m benchmarks.damm_sampling [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from benchmarks.damm_quality import CACHE, CONFIGS, QUICK, bundle_workflow, train_stage
from benchmarks.timing import figure, time_call
from damm.data import load_split
from damm.evaluation import load_items, per_item_metrics
from damm.inferers import DAMMInferer, DAMMSampleOutput
from damm.model import load_model

__all__ = ["NAME", "auroc", "run"]

NAME = "damm_sampling"

SEED = 0
FULL = {
    "overrides": {},
    "tiles": 32,
    "ddim_steps": (10, 25, 50, 100),
    "dpm_solver_steps": (5, 10, 15, 20, 25),
    "pndm_steps": (10, 25, 50),
    "main_steps": 50,
    "num_samples": (1, 4, 8),
    # timed repeats per step count of DDIM, DPM-Solver and PNDM (DDPM-1000, K > 1 and the single branches run once)
    "repeats": {5: 5, 10: 5, 15: 3, 20: 3, 25: 3, 50: 3, 100: 2},
}
# quick: the toy model of damm_quality with T = 100 training steps, so that DDPM-T takes seconds, not a minute
QUICK_RUN = {
    "overrides": {**QUICK, "num_train_timesteps": 100},
    "tiles": 4,
    "ddim_steps": (2, 4),
    "dpm_solver_steps": (2, 4),
    "pndm_steps": (2, 4),
    "main_steps": 4,
    "num_samples": (1, 4, 8),
    "repeats": {2: 3, 4: 3},
}
# sampler -> (name in the figures: "DAMM <name>-<steps> ...", plot series)
SAMPLER_LABELS = {
    "ddim": ("DDIM", "DDIM (gated)"),
    "dpm_solver": ("DPM-Solver", "DPM-Solver++(2M) (gated)"),
    "pndm": ("PNDM", "PNDM (PLMS, gated)"),
}
REFERENCE_LABEL = "DDPM-{steps} (the paper's sampler: all training steps), same model, inputs and seed"
CHANCE_LABEL = "chance (AUROC 0.5)"


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (:func:`monai.metrics.compute_roc_auc`).

    MONAI's AUROC is the Mann-Whitney statistic (a tie between a positive and a negative counts one half). A single
    class gives NaN here without calling it (MONAI would return NaN too, with a warning per call).

    Args:
        scores: one finite score per item; higher means "more likely positive".
        labels: one boolean (or 0/1) label per item.

    Returns:
        The AUROC in ``[0, 1]``, or NaN when all items are of one class (undefined).

    Raises:
        ValueError: scores and labels differ in length, or a score is not finite.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("auroc: scores must be finite")
    if y.all() or not y.any():
        return float("nan")
    return float(compute_roc_auc(torch.from_numpy(s), torch.from_numpy(y.astype(np.int64))))


def _default_source() -> str:
    return str(json.loads((CONFIGS / "common.json").read_text())["confidence_source"])


def _prepare(base: Path, overrides: dict[str, Any], tiles: int) -> dict[str, Any]:
    """Train (or reuse) the default model under ``base`` and load it, its inferer and the capped test split."""
    source = _default_source()
    data = base / "data" / "synthetic_np"
    ae_root = base / "autoencoder"
    root = base / f"diffusion_{source}"
    ov = {**overrides, "confidence_source": source}
    t0 = time.perf_counter()
    if not (root / "models" / "model.pt").is_file():
        train_stage(ae_root, data, overrides, "train_autoencoder")
        (root / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy2(ae_root / "models" / "model_autoencoder.pt", root / "models" / "model_autoencoder.pt")
        train_stage(root, data, ov, "train_diffusion")
    train_seconds = time.perf_counter() - t0
    wf = bundle_workflow(root, data, "train_diffusion", ov)
    wf.initialize()
    parser = wf.parser
    model = load_model(parser.get_parsed_content("network"), root / "models" / "model.pt")
    inferer: DAMMInferer = parser.get_parsed_content("train::inferer")
    keys = parser.get_parsed_content("modalities")
    items = load_split(parser.get_parsed_content("datalist_file"), "test", keys, tiles)
    images, info = load_items(items, parser.get_parsed_content("preprocessing"), keys)
    return {
        "model": model,
        "inferer": inferer.replace(seed=SEED, batch_size=None, progress=False, keep_samples=False),
        "target": images[model.target],
        "conditions": [images[k] for k in model.conditions],
        "divergent": np.array([bool(i["divergent"]) for i in info]),
        "ssim_win_size": int(parser.get_parsed_content("ae_ssim_win_size")),
        "spatial_dims": int(parser.get_parsed_content("spatial_dims")),
        "source": source,
        "train_seconds": train_seconds,
    }


def _timed(sample: Callable[[], DAMMSampleOutput], repeat: int) -> tuple[DAMMSampleOutput, float, float | None]:
    """Median and spread of ``repeat`` seeded runs (identical outputs); the output of the last run."""
    out: list[DAMMSampleOutput] = []
    median, spread = time_call(lambda: out.append(sample()), warmup=0, repeat=repeat)
    return out[-1], median, (spread if repeat > 1 else None)


def _quality(res: DAMMSampleOutput, ctx: dict[str, Any]) -> dict[str, np.ndarray]:
    return per_item_metrics(res.prediction, ctx["target"], ctx["spatial_dims"], ctx["ssim_win_size"])


def run(quick: bool = False) -> list[dict]:
    """Train (or reuse) the default model and measure sampling.

    Args:
        quick: toy model with T = 100 training steps, its 3-4 test tiles, DDIM-, DPM-Solver- and PNDM-{2, 4} and
            DDPM-100, in a temporary folder (well under a minute).

    Returns:
        Figure records.
    """
    torch.set_num_threads(1 if quick else max(1, min(2, torch.get_num_threads())))
    cfg = QUICK_RUN if quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="damm_sampling_")) if quick else None
    try:
        ctx = _prepare(tmp if tmp is not None else CACHE, dict(cfg["overrides"]), cfg["tiles"])
        return _measure(ctx, cfg, quick)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _measure(ctx: dict[str, Any], cfg: dict[str, Any], quick: bool) -> list[dict]:
    model, base, conditions = ctx["model"], ctx["inferer"], ctx["conditions"]
    n = int(ctx["target"].shape[0])
    threads = torch.get_num_threads()
    common = {"n_tiles": n, "threads": threads, "quick": quick, "seed": SEED, "source": ctx["source"]}
    figs: list[dict] = []
    if ctx["train_seconds"] > 1.0:
        figs.append(figure("model training wall time (not cached)", ctx["train_seconds"], "s", **common))

    def sample(inf: DAMMInferer) -> Callable[[], DAMMSampleOutput]:
        return lambda: inf.sample(conditions, model)

    sample(base.replace(num_inference_steps=2, branch="damm", num_samples=1))()  # warm-up (allocator, lazy init)

    # 1. samplers: DDPM-T (T = training steps, 1000 by default) and DDIM-N on the same inputs and seed
    ddpm = base.replace(sampler="ddpm", branch="damm", num_samples=1)
    t_ddpm = ddpm.num_inference_steps
    runs: dict[str, dict[str, Any]] = {}
    plan = [("ddpm", t_ddpm)] + [(name, s) for name in SAMPLER_LABELS for s in cfg[f"{name}_steps"]]
    for sampler, steps in plan:
        if sampler == "ddpm":
            inf = ddpm
        else:
            inf = base.replace(sampler=sampler, num_inference_steps=steps, branch="damm", num_samples=1)
        repeat = 1 if sampler == "ddpm" else int(cfg["repeats"].get(steps, 1))
        res, median, spread = _timed(sample(inf), repeat)
        runs[f"{sampler}-{steps}"] = {
            "sampler": sampler,
            "steps": steps,
            "res": res,
            "seconds": median / n,
            "spread": None if spread is None else spread / n,
            "metrics": _quality(res, ctx),
            "eta": inf.eta if sampler == "ddim" else None,
            "repeat": repeat,
            "evaluations": len(res.timesteps),
        }
    ref = runs[f"ddpm-{t_ddpm}"]
    ref_psnr, ref_ssim = float(ref["metrics"]["psnr"].mean()), float(ref["metrics"]["ssim"].mean())
    xlabel = "denoiser evaluations per sample (= steps; PNDM-N: N + 1)"
    for r in runs.values():
        is_ref = r["sampler"] == "ddpm"
        prefix, series = ("DDPM", f"DDPM-{t_ddpm} (the paper)") if is_ref else SAMPLER_LABELS[r["sampler"]]
        name = f"{prefix}-{r['steps']}"
        p = {
            "sampler": r["sampler"],
            "steps": r["steps"],
            "evaluations": r["evaluations"],
            "K": 1,
            "eta": r["eta"],
            "repeats": r["repeat"],
            **common,
        }
        psnr, ssim = float(r["metrics"]["psnr"].mean()), float(r["metrics"]["ssim"].mean())
        ref_kw: dict[str, Any] = {}
        figs.append(
            figure(
                f"DAMM {name} sampling time per image",
                r["seconds"],
                "s",
                spread=r["spread"],
                **(
                    {}
                    if is_ref
                    else {"reference": ref["seconds"], "reference_label": REFERENCE_LABEL.format(steps=t_ddpm)}
                ),
                plot={
                    "id": "DAMM sampling time vs steps",
                    "x": r["evaluations"],
                    "series": series,
                    "xlabel": xlabel,
                    "ylabel": "seconds per image",
                    "logx": True,
                    "logy": True,
                },
                **p,
            )
        )
        if not is_ref:
            ref_kw = {"reference": ref_psnr, "reference_label": REFERENCE_LABEL.format(steps=t_ddpm)}
        figs.append(
            figure(
                f"DAMM {name} gated PSNR",
                psnr,
                "dB",
                **ref_kw,
                plot={
                    "id": "DAMM sampling quality vs steps",
                    "x": r["evaluations"],
                    "series": series,
                    "xlabel": xlabel,
                    "ylabel": "PSNR of the gated prediction (dB)",
                    "logx": True,
                },
                **p,
            )
        )
        if not is_ref:
            ref_kw = {"reference": ref_ssim, "reference_label": REFERENCE_LABEL.format(steps=t_ddpm)}
        figs.append(figure(f"DAMM {name} gated SSIM", ssim, "", **ref_kw, **p))
        if not is_ref:
            figs.append(figure(f"DAMM {name} minus DDPM-{t_ddpm} PSNR", psnr - ref_psnr, "dB", **p))
            figs.append(figure(f"DAMM {name} minus DDPM-{t_ddpm} SSIM", ssim - ref_ssim, "", **p))

    # 2. K-sample averaging with DDIM-<main>
    main = int(cfg["main_steps"])
    k_runs: dict[int, dict[str, Any]] = {1: runs[f"ddim-{main}"]}
    for k in cfg["num_samples"]:
        if k == 1:
            continue
        inf = base.replace(sampler="ddim", num_inference_steps=main, branch="damm", num_samples=int(k))
        res, median, _ = _timed(sample(inf), 1)
        k_runs[int(k)] = {"seconds": median / n, "spread": None, "metrics": _quality(res, ctx), "repeat": 1}
    one = k_runs[1]
    one_psnr, one_ssim = float(one["metrics"]["psnr"].mean()), float(one["metrics"]["ssim"].mean())
    k_label = f"K = 1 (same run as DDIM-{main} above)"
    for k, r in sorted(k_runs.items()):
        p = {"sampler": "ddim", "steps": main, "K": k, "eta": base.eta, "repeats": r["repeat"], **common}
        psnr, ssim = float(r["metrics"]["psnr"].mean()), float(r["metrics"]["ssim"].mean())
        ref_kw = {} if k == 1 else {"reference_label": k_label}
        figs.append(
            figure(
                f"DAMM DDIM-{main} K={k} sampling time per image",
                r["seconds"],
                "s",
                spread=r["spread"],
                **({} if k == 1 else {"reference": one["seconds"], **ref_kw}),
                **p,
            )
        )
        figs.append(
            figure(
                f"DAMM DDIM-{main} mean of K={k} PSNR",
                psnr,
                "dB",
                **({} if k == 1 else {"reference": one_psnr, **ref_kw}),
                plot={
                    "id": "DAMM K-sample averaging",
                    "x": k,
                    "series": f"DDIM-{main}, mean of K gated samples",
                    "xlabel": "K (samples averaged)",
                    "ylabel": "PSNR (dB)",
                },
                **p,
            )
        )
        figs.append(figure(f"DAMM DDIM-{main} mean of K={k} SSIM", ssim, "", **p))
        if k > 1:
            figs.append(figure(f"DAMM DDIM-{main} K={k} PSNR gain over K=1", psnr - one_psnr, "dB", **p))
            figs.append(figure(f"DAMM DDIM-{main} K={k} SSIM gain over K=1", ssim - one_ssim, "", **p))

    # 3. confidence separation: uni vs multi alone, same seed, scored by the gated run's mean confidence
    gated = runs[f"ddim-{main}"]["res"]
    branch_psnr = {}
    for branch in ("uni", "multi"):
        inf = base.replace(sampler="ddim", num_inference_steps=main, branch=branch, num_samples=1)
        res, _, _ = _timed(sample(inf), 1)
        branch_psnr[branch] = _quality(res, ctx)["psnr"]
    p = {"sampler": "ddim", "steps": main, "K": 1, "eta": base.eta, **common}
    for branch, values in branch_psnr.items():
        figs.append(figure(f"DAMM DDIM-{main} {branch} branch alone PSNR", float(values.mean()), "dB", **p))
    if gated.confidence is None:  # cannot happen for branch="damm"; kept explicit
        raise RuntimeError("damm_sampling: the gated run returned no confidence")
    c = gated.confidence.float().mean(dim=(1, 2)).numpy().astype(np.float64)
    multi_better = branch_psnr["multi"] > branch_psnr["uni"]
    divergent = ctx["divergent"]
    for name, score, labels, pos, neg in (
        ("mean confidence c for 'multi beats uni' tiles", c, multi_better, "multi_better", "uni_better_or_tie"),
        ("1 - mean confidence c for divergent tiles", 1.0 - c, divergent, "divergent", "consistent"),
    ):
        value = auroc(score, labels)
        n_pos, n_neg = int(labels.sum()), int((~labels).sum())
        single = not np.isfinite(value)
        extra: dict[str, Any] = {f"n_{pos}": n_pos, f"n_{neg}": n_neg}
        if single:
            extra["note"] = f"only one class among the {n} tiles: AUROC undefined"
        figs.append(
            figure(
                f"AUROC of {name}",
                value,
                "",
                **({} if single else {"reference": 0.5, "reference_label": CHANCE_LABEL}),
                **extra,
                **p,
            )
        )
        figs.append(figure(f"tiles {pos.replace('_', ' ')} (of {n})", n_pos, "tiles", **p))
        for cls, mask in ((pos, labels), (neg, ~labels)):
            if mask.any():
                figs.append(
                    figure(f"mean confidence c on {cls.replace('_', ' ')} tiles", float(c[mask].mean()), "", **p)
                )
    return figs


def main() -> None:
    """Print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy model and sizes (well under a minute)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()

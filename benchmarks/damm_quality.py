"""DAMM-Diffusion quality claims on the default synthetic data (issue §6), measured through the bundle.

1. Train the autoencoders once and the diffusion model twice, with ``confidence_source="uni"`` (official) and
   ``"joint"``, with the bundle's default settings (``bundle/configs/train.json``).
2. For each: PSNR/SSIM of damm, uni and multi (DDIM-50) overall and on consistent / divergent test tiles; whether the
   gated prediction is at least as good as the better branch on each subset and by how much; the fraction of
   sampling steps gated to the multi-modal branch on consistent vs divergent tiles.
3. For the better source: DDIM-{25, 50, 100} vs DDPM-1000 time and quality (gated branch, all test tiles).

Trained models and the evaluation records are cached under ``benchmarks/results/tmp_damm_quality/`` (rerunning
reuses them; delete the folder to start afresh). ``quick=True`` runs the same path at toy size in a temporary folder.
Run alone with ``python -m benchmarks.damm_quality [--quick]``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

from benchmarks.timing import figure
from damm.data import load_split
from damm.evaluation import evaluate_model, load_items
from damm.model import load_model
from ddcore.atomic import atomic_write_json

__all__ = ["NAME", "bundle_workflow", "run", "train_stage"]

NAME = "damm_quality"

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
CACHE = REPO / "benchmarks" / "results" / "tmp_damm_quality"
SOURCES = ("uni", "joint")
SUBSETS = ("all", "consistent", "divergent")

QUICK = {
    "synthetic_args": {"n": 24, "size": 32, "divergent_fraction": 0.3, "seed": 0},
    "ae_channels": [8, 8, 8],
    "ae_norm_num_groups": 8,
    "dm_channels": [8, 8, 8, 8],
    "dm_time_embed_dim": 16,
    "ae_iterations": 4,
    "ae_batch_size": 4,
    "dm_iterations": 8,
    "dm_batch_size": 4,
    "dm_divergence_aware_start_iteration": 3,
}


def bundle_workflow(root: Path, data: Path, run_id: str, overrides: dict[str, Any]) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,  # keep stdout for the JSON figures
        run_id=run_id,
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(data),
        progress=False,
        **overrides,
    )


def train_stage(root: Path, data: Path, overrides: dict[str, Any], run_id: str) -> None:
    wf = bundle_workflow(root, data, run_id, overrides)
    wf.initialize()
    wf.run()
    wf.finalize()


def _evaluate(root: Path, data: Path, overrides: dict[str, Any], steps_list: list[int], ddpm: bool) -> dict:
    """Evaluate the model of ``root``: branches with DDIM-50 (or the first of ``steps_list``) and the samplers."""
    wf = bundle_workflow(root, data, "train_diffusion", overrides)
    wf.initialize()
    parser = wf.parser
    model = load_model(parser.get_parsed_content("network"), root / "models" / "model.pt")
    inferer = parser.get_parsed_content("train::inferer")
    keys = parser.get_parsed_content("modalities")
    items = load_split(parser.get_parsed_content("datalist_file"), "test", keys)
    images, info = load_items(items, parser.get_parsed_content("preprocessing"), keys)
    win = parser.get_parsed_content("ae_ssim_win_size")
    main_steps = 50 if 50 in steps_list else steps_list[0]
    results, _ = evaluate_model(
        model,
        inferer.replace(num_inference_steps=main_steps, progress=False),
        images,
        info,
        num_samples=0,
        ssim_win_size=win,
    )
    samplers: dict[str, Any] = {}
    runs = [("ddim", s) for s in steps_list] + ([("ddpm", 1000)] if ddpm else [])
    for sampler, steps in runs:
        inf = inferer.replace(sampler=sampler, num_inference_steps=steps, branch="damm", progress=False)
        t0 = time.perf_counter()
        res, _ = evaluate_model(model, inf, images, info, branches=("damm",), num_samples=0, ssim_win_size=win)
        samplers[f"{sampler}-{steps}"] = {"seconds": time.perf_counter() - t0, **res["methods"]["damm"]}
    results["samplers"] = samplers
    return results


def _figures(source: str, res: dict, params: dict[str, Any]) -> list[dict]:
    figs = []
    methods = res["methods"]
    subsets = [s for s in SUBSETS if s in methods["damm"]]
    for method in ("damm", "uni", "multi", "autoencoder_ceiling"):
        for subset in subsets:
            for metric, unit in (("psnr", "dB"), ("ssim", "")):
                figs.append(
                    figure(
                        f"{method} {metric.upper()} {subset} (confidence_source={source})",
                        methods[method][subset][metric],
                        unit,
                        source=source,
                        method=method,
                        subset=subset,
                        **params,
                    )
                )
    for subset, rec in res.get("claim", {}).items():
        for metric, unit in (("psnr", "dB"), ("ssim", "")):
            figs.append(
                figure(
                    f"damm minus best branch {metric.upper()} {subset} (confidence_source={source})",
                    rec[metric]["damm_minus_best_branch"],
                    unit,
                    holds=rec[metric]["holds"],
                    source=source,
                    subset=subset,
                    **params,
                )
            )
    for subset, value in methods["damm"].get("gated_multi_fraction", {}).items():
        figs.append(
            figure(
                f"fraction of steps gated to multi, {subset} tiles (confidence_source={source})",
                100.0 * value,
                "%",
                source=source,
                subset=subset,
                **params,
            )
        )
    return figs


def run(quick: bool = False) -> list[dict]:
    """Train (or reuse) and measure.

    Args:
        quick: toy sizes in a temporary folder (well under a minute).

    Returns:
        Figure records.
    """
    torch.set_num_threads(1 if quick else max(1, min(2, torch.get_num_threads())))
    tmp = Path(tempfile.mkdtemp(prefix="damm_quality_")) if quick else None
    base = tmp if tmp is not None else CACHE
    overrides: dict[str, Any] = dict(QUICK) if quick else {}
    steps_list = [2, 4] if quick else [25, 50, 100]
    data = base / "data" / "synthetic_np"
    ae_root = base / "autoencoder"
    params = {"steps": 50 if not quick else 2, "sampler": "ddim", "quick": quick}
    figs: list[dict] = []
    try:
        t0 = time.perf_counter()
        train_stage(ae_root, data, overrides, "train_autoencoder")
        figs.append(figure("stage 1 (3 autoencoders) wall time incl. reuse", time.perf_counter() - t0, "s", **params))
        results: dict[str, dict] = {}
        for source in SOURCES:
            root = base / f"diffusion_{source}"
            (root / "models").mkdir(parents=True, exist_ok=True)
            shutil.copy2(ae_root / "models" / "model_autoencoder.pt", root / "models" / "model_autoencoder.pt")
            ov = {**overrides, "confidence_source": source}
            t0 = time.perf_counter()
            train_stage(root, data, ov, "train_diffusion")
            figs.append(
                figure(f"stage 2 wall time (confidence_source={source})", time.perf_counter() - t0, "s", **params)
            )
            cached = root / "quality.json"
            if cached.is_file() and not quick:
                results[source] = json.loads(cached.read_text())
            else:
                results[source] = _evaluate(root, data, ov, steps_list, ddpm=True)
                atomic_write_json(results[source], cached)
            figs += _figures(source, results[source], params)
        better = max(SOURCES, key=lambda s: results[s]["methods"]["damm"]["all"]["psnr"])
        figs.append(
            figure(
                "better confidence_source by damm PSNR (1 = joint, 0 = uni)",
                1.0 if better == "joint" else 0.0,
                "",
                uni=results["uni"]["methods"]["damm"]["all"]["psnr"],
                joint=results["joint"]["methods"]["damm"]["all"]["psnr"],
                **params,
            )
        )
        for name, rec in results[better]["samplers"].items():
            p = {**params, "sampler": name, "steps": int(name.rsplit("-", 1)[1]), "source": better}
            figs.append(figure(f"{name} gated sampling time, {rec['all']['n']} test tiles", rec["seconds"], "s", **p))
            figs.append(figure(f"{name} damm PSNR all", rec["all"]["psnr"], "dB", **p))
            figs.append(figure(f"{name} damm SSIM all", rec["all"]["ssim"], "", **p))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

"""Precision benchmark, part 3: bf16-vs-fp32 quality parity of the trained default model.

Trains (or reuses) the bundle's default model in fp32 and in bf16 (per stage) and compares DDIM-N PSNR/SSIM
on the same test tiles and sampling seed, with the fp32 run-to-run spread (another training seed) as the noise
floor. Called by :mod:`benchmarks.precision` (``python -m benchmarks run --only precision``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.damm_quality import CACHE as QUALITY_CACHE
from benchmarks.damm_quality import QUICK as QUALITY_QUICK
from benchmarks.damm_quality import bundle_workflow, train_stage
from benchmarks.timing import figure
from damm.data import load_split
from damm.evaluation import load_items, per_item_metrics
from damm.model import load_model

__all__ = ["parity"]

REPO = Path(__file__).resolve().parents[1]
COMMON_JSON = REPO / "bundle" / "configs" / "common.json"  # network, diffusion, precision (merged first)
CACHE = REPO / "benchmarks" / "results" / "tmp_precision"
BUNDLE_DEFAULT = "bundle default (train.json)"
#: Parity targets of issue 9.
TARGET_PARITY_PSNR_DB = 0.1
TARGET_PARITY_SSIM = 0.002


# ---------------------------------------------------------------------------------------------------- 3. parity
def _has_precision_setting() -> bool:
    return "precision" in json.loads(COMMON_JSON.read_text())


def parity(quick: bool, cfg: dict[str, Any], common: dict[str, Any]) -> list[dict]:
    """Train (or reuse) the default model in fp32 and bf16, sample each with DDIM-N and compare PSNR/SSIM."""
    if not _has_precision_setting():
        raise RuntimeError(f"{COMMON_JSON} has no 'precision' entry: bf16 training parity cannot be measured")
    tmp = Path(tempfile.mkdtemp(prefix="precision_")) if quick else None
    base = tmp if tmp is not None else CACHE
    overrides: dict[str, Any] = dict(QUALITY_QUICK) if quick else {}
    source = str(json.loads(COMMON_JSON.read_text())["confidence_source"])
    quality_root = QUALITY_CACHE / f"diffusion_{source}"
    reuse = not quick and (quality_root / "models" / "model.pt").is_file()
    data = (QUALITY_CACHE if reuse else base) / "data" / "synthetic_np"
    fp32_root = quality_root if reuse else base / "fp32"
    # variant -> (root, training overrides, stages to train); "bf16 diffusion" reuses the fp32 autoencoders
    variants: dict[str, tuple[Path, dict[str, Any], tuple[str, ...]]] = {
        "fp32": (fp32_root, {"precision": "fp32"}, () if reuse else ("train_autoencoder", "train_diffusion")),
        "bf16": (base / "bf16", {"precision": "bf16"}, ("train_autoencoder", "train_diffusion")),
        "bf16 diffusion": (base / "bf16_diffusion", {"dm_precision": "bf16"}, ("train_diffusion",)),
        # the run-to-run spread of fp32 training itself (another seed): the noise floor of every parity figure
        "fp32 seed 1": (
            base / "fp32_seed1",
            {"precision": "fp32", "seed": 1},
            ("train_autoencoder", "train_diffusion"),
        ),
    }
    steps = cfg["parity_steps"]
    figs: list[dict] = []
    # training runs single-threaded, like the damm_quality reference model, so that only the precision differs
    # (results are bit-reproducible per thread count, not across thread counts)
    threads = torch.get_num_threads()
    try:
        models: dict[str, Any] = {}
        ctx: dict[str, Any] = {}
        for variant, (root, prec_ov, stages) in variants.items():
            ov = {**overrides, **prec_ov}
            t0 = time.perf_counter()
            if "train_autoencoder" not in stages and stages:
                (root / "models").mkdir(parents=True, exist_ok=True)
                src = fp32_root / "models" / "model_autoencoder.pt"
                if not (root / "models" / "model_autoencoder.pt").is_file():
                    shutil.copy2(src, root / "models" / "model_autoencoder.pt")
            torch.set_num_threads(1)
            try:
                for stage in stages:
                    train_stage(root, data, ov, stage)
            finally:
                torch.set_num_threads(threads)
            seconds = time.perf_counter() - t0
            if seconds > 1.0:
                figs.append(
                    figure(
                        f"parity: {variant} training wall time ({', '.join(stages)}; 1 thread; 0 if cached)",
                        seconds,
                        "s",
                        precision=variant,
                        config=BUNDLE_DEFAULT,
                        channels_last=False,
                        training_threads=1,
                        **common,
                    )
                )
            wf = bundle_workflow(root, data, "train_diffusion", ov)
            wf.initialize()
            parser = wf.parser
            models[variant] = load_model(parser.get_parsed_content("network"), root / "models" / "model.pt")
            if not ctx:
                keys = parser.get_parsed_content("modalities")
                items = load_split(parser.get_parsed_content("datalist_file"), "test", keys)
                images, _ = load_items(items, parser.get_parsed_content("preprocessing"), keys)
                ctx = {
                    "inferer": parser.get_parsed_content("train#inferer").replace(
                        sampler="ddim", num_inference_steps=steps, branch="damm", progress=False
                    ),
                    "images": images,
                    "win": int(parser.get_parsed_content("ae_ssim_win_size")),
                    "spatial_dims": int(parser.get_parsed_content("spatial_dims")),
                }
        scores: dict[str, dict[str, float]] = {}
        for name, trained, sampled in (
            ("fp32", "fp32", "fp32"),
            ("bf16", "bf16", "bf16"),
            ("bf16 diffusion on fp32 autoencoders", "bf16 diffusion", "bf16"),
            ("fp32 model sampled in bf16", "fp32", "bf16"),
            ("fp32 trained with seed 1", "fp32 seed 1", "fp32"),
        ):
            model = models[trained]
            inferer = ctx["inferer"].replace(precision=sampled)
            out = inferer.sample([ctx["images"][c] for c in model.conditions], model)
            vals = per_item_metrics(out.prediction, ctx["images"][model.target], ctx["spatial_dims"], ctx["win"])
            scores[name] = {"psnr": float(vals["psnr"].mean()), "ssim": float(vals["ssim"].mean())}
            n = int(vals["psnr"].shape[0])
            p = {
                "precision": sampled,
                "trained": trained,
                "config": BUNDLE_DEFAULT,
                "batch": inferer.batch_size,
                "channels_last": False,
                "sampler": f"ddim-{steps}",
                "eta": inferer.eta,
                "seed": inferer.seed,
                "n_tiles": n,
            }
            for metric, unit in (("psnr", "dB"), ("ssim", "")):
                figs.append(
                    figure(f"parity: {name}: DDIM-{steps} {metric.upper()}", scores[name][metric], unit, **p, **common)
                )
        for variant, model in models.items():  # the stage-1 ceiling of each variant localises a quality loss
            ae = model.autoencoders[model.target]
            target = ctx["images"][model.target]
            with torch.no_grad():
                recon = ae.decode(ae.encode(target)).float()
            vals = per_item_metrics(recon, target, ctx["spatial_dims"], ctx["win"])
            figs.append(
                figure(
                    f"parity: {variant}: target autoencoder reconstruction PSNR (ceiling, fp32 eval)",
                    float(vals["psnr"].mean()),
                    "dB",
                    precision=variant,
                    config=BUNDLE_DEFAULT,
                    channels_last=False,
                    **common,
                )
            )
        for name, label in (
            ("bf16", "both stages trained and sampled in bf16"),
            ("bf16 diffusion on fp32 autoencoders", "stage 2 trained and sampled in bf16"),
            ("fp32 model sampled in bf16", "sampling only"),
            ("fp32 trained with seed 1", "fp32 with another training seed: run-to-run spread, not a precision effect"),
        ):
            for metric, unit, limit in (("psnr", "dB", TARGET_PARITY_PSNR_DB), ("ssim", "", TARGET_PARITY_SSIM)):
                delta = scores[name][metric] - scores["fp32"][metric]
                figs.append(
                    figure(
                        f"parity: absolute {metric.upper()} difference to fp32 ({label})",
                        abs(delta),
                        unit,
                        reference=limit,
                        reference_label=f"issue 9 target: |delta| <= {limit}",
                        delta=round(delta, 5),
                        holds=abs(delta) <= limit,
                        precision="fp32" if "seed" in name else "bf16",
                        config=BUNDLE_DEFAULT,
                        channels_last=False,
                        fp32_model=str(fp32_root.relative_to(REPO)) if tmp is None else "temporary (quick)",
                        **common,
                    )
                )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return figs

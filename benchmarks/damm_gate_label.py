"""How much does the gate's training label say about divergence? (issue 14, part 1: the diagnosis)

The DAMMP confidence is trained towards the label ``y = [l_multi <= l_uni]``, the comparison of the two branches'
denoising errors at one random ``(t, eps)`` per sample (the paper), or averaged over a few draws
(``dm_gate_training: averaged``). A gate can only learn to separate divergent tiles if that label does. This
benchmark takes trained main-job models (the README main job's data and budget, through :mod:`benchmarks.damm_gate`'s
cache: the same runs) and, for every tile of the training split (where the labels are formed) and of the test split,
draws ``DRAWS`` ``(t, eps)`` pairs (``t`` stratified over the four timestep quarters), runs both branches as the
trainer does and records ``delta = l_uni - l_multi`` (positive: the multi-modal branch is better, label 1).

Figures per run and split:

- the label rate on consistent and on divergent tiles, per timestep quarter and overall;
- ``label_divergence_agreement``: share of single labels equal to "not divergent" (0.5 = no information);
- AUROC for divergent tiles of one label's score (``-delta`` at one draw, averaged over the draws) and of the score
  averaged over all draws (the best any label built from these errors can do with that many draws);
- sign consistency ``mean |2 p - 1|`` (``p``: a tile's share of draws labelled 1; 0 = a coin toss per draw,
  1 = every draw agrees);
- mean ``delta`` relative to the mean branch error, per subset (how much the auxiliary modality helps or hurts);
- AUROC of ``1 - c`` (the confidence in the same passes) for divergent tiles: what the gate learnt.

Run: ``python -m benchmarks.damm_gate_label [--quick] [--variants paper both]`` (full: trains the runs it lacks,
two at a time on one thread each, about 13 minutes on 2 idle cores (the record's time); cached runs are reused).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.damm_gate import CACHE, run_plan
from benchmarks.damm_sampling import auroc
from benchmarks.timing import figure

__all__ = ["DRAWS", "NAME", "PLAN", "label_information", "label_statistics", "run"]

NAME = "damm_gate_label"

#: ``(t, eps)`` draws per tile (a multiple of the four timestep quarters).
DRAWS = 32
#: the runs measured: the paper's procedure and the variant that avoids the collapse, seed 0, one thread.
PLAN: tuple[tuple[str, int, int], ...] = (("paper", 0, 1), ("both", 0, 1))
SPLITS = ("training", "test")
QUARTERS = 4


@torch.no_grad()
def label_information(
    model: Any, inferer: Any, images: dict[str, torch.Tensor], draws: int = DRAWS, seed: int = 0, batch: int = 64
) -> dict[str, np.ndarray]:
    """Both branches' denoising errors at ``draws`` ``(t, eps)`` pairs per tile, as the trainer computes them.

    Args:
        model: the composite DAMM model (autoencoders and denoiser).
        inferer: the training :class:`damm.inferers.DAMMInferer` (its scheduler sets ``T``).
        images: ``{modality: [N, C, *spatial]}`` holding the target and the conditions.
        draws: pairs per tile; ``t`` is stratified: draw ``k`` falls in timestep quarter ``k % 4``.
        seed: seed of the draws.
        batch: tiles per forward pass.

    Returns:
        ``l_uni``, ``l_multi``, ``confidence`` (mean of the confidence map) and ``t``, each ``[N, draws]``.
    """
    from damm.losses import branch_errors, diffusion_target

    scheduler = inferer.scheduler
    n_steps = int(scheduler.num_train_timesteps)
    edges = [round(i * n_steps / QUARTERS) for i in range(QUARTERS + 1)]
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    target_ae = model.autoencoders[model.target]
    n = images[model.target].shape[0]
    out = {k: np.zeros((n, draws)) for k in ("l_uni", "l_multi", "confidence", "t")}
    for start in range(0, n, batch):
        sl = slice(start, min(n, start + batch))
        z0 = target_ae.encode_scaled(images[model.target][sl].float()).float()
        conds = inferer.encode_conditions(model, [images[k][sl] for k in model.conditions])
        for k in range(draws):
            q = k % QUARTERS
            t = torch.randint(edges[q], edges[q + 1], (z0.shape[0],), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            res = inferer.noise_prediction(model.denoiser, z0, conds, noise, t, use_uncertainty=True)
            l_u, l_m = branch_errors(res, diffusion_target(scheduler, z0, noise, t))
            out["l_uni"][sl, k] = l_u.numpy()
            out["l_multi"][sl, k] = l_m.numpy()
            out["confidence"][sl, k] = res.confidence.float().reshape(z0.shape[0], -1).mean(dim=1).numpy()
            out["t"][sl, k] = t.numpy()
    return out


def label_statistics(info: dict[str, np.ndarray], divergent: np.ndarray, n_steps: int) -> dict[str, float]:
    """Scores of the label (see the module docstring) from :func:`label_information`'s arrays.

    Args:
        info: ``l_uni``, ``l_multi``, ``confidence``, ``t``, each ``[N, K]``.
        divergent: ``[N]`` booleans.
        n_steps: the number of training timesteps ``T`` (for the quarters).

    Returns:
        Named figures (rates and shares in %, AUROCs in [0, 1], relative deltas in %).
    """
    div = np.asarray(divergent, dtype=bool)
    delta = info["l_uni"] - info["l_multi"]
    label = delta >= 0  # y = [l_multi <= l_uni]
    stats: dict[str, float] = {}
    for subset, mask in (("consistent", ~div), ("divergent", div)):
        stats[f"label_rate_{subset}"] = 100.0 * float(label[mask].mean()) if mask.any() else float("nan")
        quarter = np.minimum((info["t"][mask] * QUARTERS // n_steps).astype(int), QUARTERS - 1)
        for q in range(QUARTERS):
            sel = quarter == q
            lo, hi = round(q * n_steps / QUARTERS), round((q + 1) * n_steps / QUARTERS)
            value = 100.0 * float(label[mask][sel].mean()) if sel.any() else float("nan")
            stats[f"label_rate_{subset}_t{lo}_{hi}"] = value
        mean_err = 0.5 * (info["l_uni"][mask] + info["l_multi"][mask])
        stats[f"relative_delta_{subset}"] = 100.0 * float(delta[mask].mean() / mean_err.mean()) if mask.any() else 0.0
    stats["label_divergence_agreement"] = 100.0 * float((label == ~div[:, None]).mean())
    single = [auroc(-delta[:, k], div) for k in range(delta.shape[1])]
    stats["auroc_one_label"] = float(np.nanmean(single))
    stats["auroc_averaged_label"] = auroc(-delta.mean(axis=1), div)
    p = label.mean(axis=1)
    stats["sign_consistency"] = float(np.abs(2.0 * p - 1.0).mean())
    stats["auroc_confidence"] = auroc(1.0 - info["confidence"].mean(axis=1), div)
    return stats


def measure_run(job: dict[str, Any]) -> dict[str, Any]:
    """Label information of one trained run of :mod:`benchmarks.damm_gate`'s cache, per split (cached)."""
    from benchmarks.damm_quality import bundle_workflow
    from damm.data import load_split
    from damm.evaluation import load_items
    from damm.model import load_model
    from ddcore.atomic import atomic_write_json

    root, data = Path(job["root"]), Path(job["data"])
    cached = root / f"label_information_{job['draws']}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    torch.set_num_threads(job["threads"])
    wf = bundle_workflow(root, data, "train_diffusion", job["overrides"])
    wf.initialize()
    parser = wf.parser
    model = load_model(parser.get_parsed_content("network"), root / "models" / "model.pt")
    keys = parser.get_parsed_content("modalities")
    inferer = parser.get_parsed_content("train::inferer")
    n_steps = int(inferer.scheduler.num_train_timesteps)
    result: dict[str, Any] = {}
    for split in SPLITS:
        items = load_split(parser.get_parsed_content("datalist_file"), split, keys)
        images, item_info = load_items(items, parser.get_parsed_content("preprocessing"), keys)
        divergent = np.array([bool(i["divergent"]) for i in item_info])
        info = label_information(model, inferer, images, draws=job["draws"], seed=1000 + job["seed"])
        result[split] = {"tiles": int(divergent.size), "divergent_tiles": int(divergent.sum())}
        result[split].update(label_statistics(info, divergent, n_steps))
    atomic_write_json(result, cached)
    return result


_LABELS = {
    "label_rate_consistent": "label rate (multi better) on consistent tiles",
    "label_rate_divergent": "label rate (multi better) on divergent tiles",
    "label_divergence_agreement": "single labels equal to 'not divergent'",
    "auroc_one_label": "AUROC for divergent tiles of one label's score",
    "auroc_averaged_label": "AUROC for divergent tiles of the score averaged over the draws",
    "sign_consistency": "label sign consistency over draws, mean |2p - 1|",
    "relative_delta_consistent": "multi-modal gain in denoising error on consistent tiles",
    "relative_delta_divergent": "multi-modal gain in denoising error on divergent tiles",
    "auroc_confidence": "AUROC of 1 - c for divergent tiles (same passes)",
}


def _label(key: str) -> str:
    if key in _LABELS:
        return _LABELS[key]
    subset, bounds = key[len("label_rate_") :].split("_t", 1)
    lo, hi = bounds.split("_")
    return f"label rate (multi better) on {subset} tiles at t in [{lo}, {hi})"


def _unit(key: str) -> str:
    return "" if key.startswith(("auroc", "sign")) else "%"


def run(quick: bool = False, variants: list[str] | None = None) -> list[dict]:
    """Train (or reuse) the runs of :data:`PLAN` and measure their label information.

    Args:
        quick: toy sizes in a temporary folder (a plumbing check), 8 draws.
        variants: names of :data:`benchmarks.damm_gate.VARIANTS` (seed 0, one thread each); default :data:`PLAN`.

    Returns:
        Figure records.
    """
    plan = list(PLAN) if variants is None else [(v, 0, 1) for v in variants]
    draws = 8 if quick else DRAWS
    tmp = Path(tempfile.mkdtemp(prefix="damm_gate_label_")) if quick else None
    try:
        jobs, _ = run_plan(plan, quick, tmp if tmp is not None else CACHE, NAME, draws=draws)  # trains what is missing
        figs: list[dict] = []
        for job in jobs:
            res = measure_run(job)
            for split in SPLITS:
                rec = res[split]
                p = {"variant": job["variant"], "seed": job["seed"], "threads": job["threads"], "split": split,
                     "draws": draws, "tiles": rec["tiles"], "divergent_tiles": rec["divergent_tiles"]}  # fmt: skip
                for key, value in rec.items():
                    if key in ("tiles", "divergent_tiles"):
                        continue
                    name = f"gate label, {job['variant']} seed {job['seed']}, {split} split: {_label(key)}"
                    figs.append(figure(name, value, _unit(key), quick=quick, key=key, **p))
        return figs
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.damm_gate_label", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", nargs="+", default=None)
    args = parser.parse_args(argv)
    for fig in run(quick=args.quick, variants=args.variants):
        print(json.dumps(fig))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

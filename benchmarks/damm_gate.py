"""Does the DAMMP gate separate divergent inputs, stably across seeds and thread counts? (issue 14)

The README main job's data (synthetic NP tiles with known divergent tiles, ``bundle/configs/train.json``): the
autoencoders are trained once (seed 0); the diffusion model is trained for every ``(variant, seed, threads)`` of
:data:`FULL_PLAN` (gate-training variants of :data:`VARIANTS`; the same iteration budget each time, so the runs
differ only in what the variant, the seed and the thread count change). Each model is
evaluated on the whole test split with DDIM-50, the gated sampler under every sampling-time decision of
:data:`damm.inferers.GATE_DECISIONS` (``per_step``, the paper; ``per_sample``; ``blend``, the soft gate
``c · multi + (1 - c) · uni``) and the two branches alone (same seed), and scored by:

- AUROC of ``1 - c`` (the gate's confidence averaged over the sampling steps) for divergent tiles;
- routing: the share of divergent tiles sent to uni and of consistent tiles sent to multi (per-sample decision, or
  for ``per_step`` and ``blend`` whether at least half of a tile's steps went to multi, i.e. had ``c >= gamma``);
- gated PSNR minus the better branch (``max(uni, multi)``) on the consistent and on the divergent subset;
- the direction of routing (divergent tiles to multi less often than consistent ones) on each thread count.

Every figure is given per run (params ``variant``, ``seed``, ``threads``) and as mean with the seed spread (sd).
Runs are cached under ``benchmarks/results/tmp_damm_gate/`` (a killed run resumes from its last checkpoint, an
evaluated one is reused). One-thread runs go two at a time on a 2-core machine (spawned processes).
Run: ``python -m benchmarks.damm_gate [--quick] [--variants paper averaged] [--seeds 0 1 2] [--threads 1 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.damm_quality import QUICK as QUALITY_QUICK
from benchmarks.damm_sampling import auroc
from benchmarks.timing import figure
from damm.inferers import GATE_DECISIONS

__all__ = ["FULL_PLAN", "NAME", "SEEDS", "THREADS", "VARIANTS", "run", "run_plan", "run_statistics", "training_summary"]

NAME = "damm_gate"

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "results" / "tmp_damm_gate"

#: gate-training variant -> train.json overrides ("paper" is the bundle default).
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "averaged": {
        "dm_gate_training": "averaged",
        "dm_gate_balance": True,
        "dm_gate_calibration_fraction": 0.1,
    },
    "both": {
        "dm_gate_branch_loss": "both",
        "dm_gate_training": "averaged",
        "dm_gate_balance": True,
        "dm_gate_calibration_fraction": 0.1,
    },
    "both_alpha": {
        "dm_gate_branch_loss": "both",
        "dm_gate_training": "averaged",
        "dm_gate_balance": True,
        "dm_gate_calibration_fraction": 0.1,
        "dm_alpha": 0.01,
    },
    "correspondence": {
        "dm_gate_training": "correspondence",
        "dm_gate_branch_loss": "both",
        "dm_gate_balance": True,
        "dm_alpha": 0.01,
    },
    "conditions": {
        "confidence_source": "conditions",
        "dm_gate_training": "correspondence",
        "dm_gate_branch_loss": "both",
        "dm_gate_balance": True,
        "dm_alpha": 1.0,
    },
    "conditions_gated": {
        "confidence_source": "conditions",
        "dm_gate_training": "correspondence",
        "dm_gate_branch_loss": "gated",
        "dm_gate_balance": True,
        "dm_alpha": 1.0,
    },
}
SEEDS = (0, 1, 2)
THREADS = (1, 2)
#: the runs of the full benchmark, ``(variant, seed, threads)``: the confidence from the clean condition latents,
#: trained on genuine against mismatched pairs, with both branches trained on every sample (``conditions``) or the
#: multi-modal branch only on the samples the gate sends to it (``conditions_gated``), on three seeds and both
#: thread counts; on one seed: ``both`` (avoids the collapse of the paper's procedure), ``both_alpha`` (the same with
#: a 100x confidence weight: ``benchmarks/damm_gate_label.py`` found its label informative and the bottleneck
#: confidence not learning it), ``correspondence`` (the mismatch label with the bottleneck confidence), the paper and
#: the averaged label with the paper's gated loss (both collapse).
FULL_PLAN: tuple[tuple[str, int, int], ...] = (
    ("conditions_gated", 0, 1),
    ("conditions", 2, 1),
    ("conditions_gated", 1, 1),
    ("conditions_gated", 2, 1),
    ("conditions", 0, 1),
    ("conditions", 1, 1),
    ("averaged", 0, 1),
    ("conditions", 0, 2),
    ("conditions_gated", 0, 2),
    ("both_alpha", 0, 1),
    ("correspondence", 0, 1),
    ("paper", 0, 1),
    ("both", 0, 1),
)
#: the sampling-time decisions evaluated (all the inferer offers)
DECISIONS = GATE_DECISIONS
SUBSETS = ("consistent", "divergent")
TARGET_AUROC = 0.85
TARGET_ROUTING = 80.0


def evaluate_run(root: Path, data: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Gate statistics of the trained model under ``root`` (see the module docstring)."""
    from benchmarks.damm_quality import bundle_workflow
    from damm.data import load_split
    from damm.evaluation import load_items, per_item_metrics
    from damm.model import load_model

    wf = bundle_workflow(root, data, "train_diffusion", overrides)
    wf.initialize()
    parser = wf.parser
    model = load_model(parser.get_parsed_content("network"), root / "models" / "model.pt")
    keys = parser.get_parsed_content("modalities")
    items = load_split(parser.get_parsed_content("datalist_file"), "test", keys)
    images, info = load_items(items, parser.get_parsed_content("preprocessing"), keys)
    win = int(parser.get_parsed_content("ae_ssim_win_size"))
    base = parser.get_parsed_content("train::inferer").replace(
        sampler="ddim", num_inference_steps=50, num_samples=1, progress=False
    )
    target, conditions = images[model.target], [images[k] for k in model.conditions]
    out: dict[str, Any] = {"divergent": [bool(i["divergent"]) for i in info]}
    for branch in ("uni", "multi"):
        res = base.replace(branch=branch).sample(conditions, model)
        out[f"{branch}_psnr"] = per_item_metrics(res.prediction, target, 2, win)["psnr"].tolist()
    for decision in DECISIONS:
        res = base.replace(branch="damm", gate_decision=decision).sample(conditions, model)
        out[decision] = {
            "psnr": per_item_metrics(res.prediction, target, 2, win)["psnr"].tolist(),
            "confidence": res.confidence.float().mean(dim=(1, 2)).tolist(),
            "multi": (res.sample_choices.float().mean(dim=1) >= 0.5).tolist(),
            "multi_step_fraction": res.gate_choices.float().mean(dim=(1, 2)).tolist(),
        }
    return out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) one variant/seed/thread-count model and evaluate it (in its own process)."""
    import torch

    from benchmarks.damm_quality import train_stage
    from ddcore.atomic import atomic_write_json

    torch.set_num_threads(job["threads"])
    root, data = Path(job["root"]), Path(job["data"])
    cached = root / "gate.json"
    if cached.is_file():
        result = json.loads(cached.read_text())
    else:
        (root / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(job["ae"]), root / "models" / "model_autoencoder.pt")
        train_stage(root, data, job["overrides"], "train_diffusion")
        result = evaluate_run(root, data, job["overrides"])
    if "training" not in result:
        result["training"] = training_summary(root)
        atomic_write_json(result, cached)
    return result


#: epoch metrics of the diffusion trainer read back from its TensorBoard log (the last epoch's value)
TRAINING_TAGS = ("epoch_label_rate", "epoch_confidence_mean", "epoch_loss_uni", "epoch_loss_multi")


def training_summary(root: Path) -> dict[str, float]:
    """The last epoch's label rate, mean confidence and branch losses of the run under ``root`` (TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((root / "eval" / "tensorboard" / "diffusion").glob("events.out.tfevents.*"))
    out: dict[str, float] = {}
    for f in files:  # a resumed run writes a second file; the later value wins
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in TRAINING_TAGS:
            if tag in acc.Tags()["scalars"]:
                out[tag] = float(acc.Scalars(tag)[-1].value)
    return out


def _run_jobs(jobs: list[dict[str, Any]], cores: int) -> list[dict[str, Any]]:
    """Run jobs grouped by thread count, ``cores // threads`` at a time, each in a spawned process."""
    results: dict[int, dict[str, Any]] = {}
    for threads in sorted({j["threads"] for j in jobs}):
        group = [(i, j) for i, j in enumerate(jobs) if j["threads"] == threads]
        workers = max(1, min(len(group), cores // threads))
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for (i, _), res in zip(group, pool.map(run_job, [j for _, j in group])):
                results[i] = res
    return [results[i] for i in range(len(jobs))]


def run_statistics(res: dict[str, Any], decision: str) -> dict[str, float]:
    """The scores of one evaluated run under one sampling-time decision.

    Args:
        res: :func:`evaluate_run`'s record.
        decision: one of :data:`DECISIONS`.

    Returns:
        ``auroc``, ``divergent_to_uni`` and ``consistent_to_multi`` (%), ``gated_minus_best_<subset>`` (dB),
        ``routing_direction`` (consistent minus divergent share of steps to multi, percentage points), and the
        mean PSNR of the gated prediction and of each branch alone (dB).
    """
    div = np.asarray(res["divergent"], dtype=bool)
    rec = res[decision]
    multi = np.asarray(rec["multi"], dtype=bool)
    steps = np.asarray(rec["multi_step_fraction"], dtype=np.float64)
    gated, uni, mul = (np.asarray(x, dtype=np.float64) for x in (rec["psnr"], res["uni_psnr"], res["multi_psnr"]))
    stats = {
        "auroc": auroc(1.0 - np.asarray(rec["confidence"], dtype=np.float64), div),
        "divergent_to_uni": 100.0 * float((~multi[div]).mean()),
        "consistent_to_multi": 100.0 * float(multi[~div].mean()),
        "routing_direction": 100.0 * float(steps[~div].mean() - steps[div].mean()),
        "gated_psnr": float(gated.mean()),
        "uni_psnr": float(uni.mean()),
        "multi_psnr": float(mul.mean()),
    }
    for subset, mask in (("consistent", ~div), ("divergent", div)):
        best = max(float(uni[mask].mean()), float(mul[mask].mean()))
        stats[f"gated_minus_best_{subset}"] = float(gated[mask].mean()) - best
    return stats


_UNITS = {"auroc": "", "divergent_to_uni": "%", "consistent_to_multi": "%", "routing_direction": "pp"}
_LABELS = {
    "auroc": "AUROC of 1 - c for divergent tiles",
    "divergent_to_uni": "divergent tiles routed to uni",
    "consistent_to_multi": "consistent tiles routed to multi",
    "routing_direction": "steps to multi, consistent minus divergent",
    "gated_minus_best_consistent": "gated minus best branch PSNR, consistent tiles",
    "gated_minus_best_divergent": "gated minus best branch PSNR, divergent tiles",
    "gated_psnr": "gated PSNR, all tiles",
    "uni_psnr": "uni branch alone PSNR, all tiles",
    "multi_psnr": "multi branch alone PSNR, all tiles",
}


def _figures(runs: list[tuple[dict[str, Any], dict[str, Any]]], quick: bool) -> list[dict]:
    figs: list[dict] = []
    table: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for job, res in runs:
        for decision in [d for d in DECISIONS if d in res]:  # a run cached before a decision existed lacks it
            stats = run_statistics(res, decision)
            key = (job["variant"], decision, job["threads"])
            table.setdefault(key, []).append(stats)
            p = {"variant": job["variant"], "decision": decision, "seed": job["seed"], "threads": job["threads"]}
            for k, v in stats.items():
                label = f"{job['variant']} {decision} seed {job['seed']} {job['threads']} thr: {_LABELS[k]}"
                figs.append(figure(label, v, _UNITS.get(k, "dB"), quick=quick, **p))
        for tag, v in res.get("training", {}).items():
            p = {"variant": job["variant"], "seed": job["seed"], "threads": job["threads"], "quick": quick}
            name = f"{job['variant']} seed {job['seed']} {job['threads']} thr: last training epoch's {tag[6:]}"
            figs.append(figure(name, v, "", tag=tag, **p))
    for (variant, decision, threads), rows in sorted(table.items()):
        p = {"variant": variant, "decision": decision, "threads": threads, "seeds": len(rows), "quick": quick}
        for k in rows[0]:
            vals = np.array([r[k] for r in rows], dtype=np.float64)
            extra: dict[str, Any] = {"sd": float(vals.std(ddof=1)) if len(vals) > 1 else None}
            if k == "auroc":
                extra["target"], extra["met"] = TARGET_AUROC, bool(vals.mean() >= TARGET_AUROC)
            elif k in ("divergent_to_uni", "consistent_to_multi"):  # the target holds for both shares at once
                both = [np.mean([r[x] for r in rows]) for x in ("divergent_to_uni", "consistent_to_multi")]
                extra["target"], extra["met"] = TARGET_ROUTING, bool(min(both) >= TARGET_ROUTING)
            elif k.startswith("gated_minus_best"):
                extra["every_seed_at_least_best"] = bool((vals >= 0).all())
            name = f"{variant} {decision} {threads} thr, mean of {len(rows)} seeds: {_LABELS[k]}"
            figs.append(figure(name, float(vals.mean()), _UNITS.get(k, "dB"), **extra, **p))
        if threads != min(t for _, _, t in table):
            continue
        other = [t for v, d, t in table if v == variant and d == decision and t != threads]
        for t2 in other:
            dirs = [np.sign(r["routing_direction"]) for r in rows + table[(variant, decision, t2)]]
            same = bool(len(set(dirs)) == 1)
            figs.append(
                figure(
                    f"{variant} {decision}: same routing direction on {threads} and {t2} threads, every seed",
                    1.0 if same else 0.0,
                    "",
                    variant=variant,
                    decision=decision,
                    quick=quick,
                )
            )
    return figs


#: the quick run: damm_quality's toy sizes, a few more diffusion iterations
QUICK = {**QUALITY_QUICK, "dm_iterations": 10}


def run(
    quick: bool = False,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    threads: list[int] | None = None,
) -> list[dict]:
    """Train (or reuse), evaluate and score every variant x seed x thread-count run.

    Args:
        quick: toy sizes in a temporary folder, one seed, one thread.
        variants: names of :data:`VARIANTS`; with ``seeds`` and ``threads``, their product is run.
        seeds: training seeds (default :data:`SEEDS`).
        threads: torch thread counts (default :data:`THREADS`).
            With none of the three given, the full run is :data:`FULL_PLAN` (quick: every variant, seed 0, 1 thread).

    Returns:
        Figure records.
    """

    if not quick and variants is None and seeds is None and threads is None:
        plan = list(FULL_PLAN)
    else:
        plan = [
            (v, s, t)
            for v in (variants or list(VARIANTS))
            for s in (seeds if seeds is not None else ([0] if quick else SEEDS))
            for t in (threads if threads is not None else ([1] if quick else THREADS))
        ]
    tmp = Path(tempfile.mkdtemp(prefix="damm_gate_")) if quick else None
    try:
        jobs, results = run_plan(plan, quick, tmp if tmp is not None else CACHE, NAME)
        return _figures(list(zip(jobs, results)), quick)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run_plan(
    plan: list[tuple[str, int, int]], quick: bool, base: Path, benchmark: str, **job_fields: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train the autoencoders once and every ``(variant, seed, threads)`` run of ``plan`` under ``base`` (cached).

    Args:
        plan: the runs; variants from :data:`VARIANTS`.
        quick: toy sizes (:data:`QUICK`), one run at a time.
        base: the cache folder (data, autoencoder and one folder per run).
        benchmark: name for the error message.
        job_fields: added to every job (e.g. settings of a later measurement).

    Returns:
        ``(jobs, results)``: the job dicts and :func:`run_job`'s records, in plan order.

    Raises:
        ValueError: an unknown variant (before anything is trained).
    """
    from benchmarks.damm_quality import train_stage

    unknown = sorted({v for v, _, _ in plan if v not in VARIANTS})
    if unknown:
        raise ValueError(f"{benchmark}: unknown variants {unknown}; expected some of {sorted(VARIANTS)}")
    common = dict(QUICK) if quick else {}
    data, ae_root = base / "data" / "synthetic_np", base / "autoencoder"
    train_stage(ae_root, data, {**common, "num_threads": 1}, "train_autoencoder")
    jobs = [
        {
            "variant": v,
            "seed": s,
            "threads": t,
            "root": str(base / f"{v}_seed{s}_threads{t}"),
            "data": str(data),
            "ae": str(ae_root / "models" / "model_autoencoder.pt"),
            "overrides": {**common, **VARIANTS[v], "seed": s, "num_threads": t},
            **job_fields,
        }
        for v, s, t in plan
    ]
    results = _run_jobs(jobs, cores=1 if quick else max(1, len(os.sched_getaffinity(0))))
    return jobs, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.damm_gate", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--threads", nargs="+", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.variants, args.seeds, args.threads), indent=2))


if __name__ == "__main__":
    main()

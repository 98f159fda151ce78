"""Does the recommended gate pick the better branch on a subject it has never seen? (issue 14, the BraTS target)

The cross-subject BraTS protocol of :mod:`benchmarks.task_brats` (train the task bundle on one patient's axial
slices, evaluate the whole brain of the other patient, both directions), with the gate trained the way the README
recommends (:data:`benchmarks.damm_gate.VARIANTS` ``["conditions_gated"]``: the confidence from the clean condition
latents, trained on genuine against mismatched pairs, the paper's gated branch loss, alpha 1.0) and every other
setting as in ``task_brats``'s 2 mm recipe (``FULL_2MM``, the recipe this check was measured with). The gated
sampler (DDIM-50) with the paper's per-step decision (``damm``) and with the soft ``blend`` decision
(``damm_blend``: ``c * eps_multi + (1 - c) * eps_uni``), both from the same trained model, and the two branches
alone are scored on the brain (PSNR, SSIM, MAE); the figures of interest:

- gated PSNR minus ``max(uni, multi)`` per direction and decision (target of issue 14: >= 0);
- the fraction of steps the gate sent to the multi-modal branch (every pair of a real subject is genuine, so a
  gate that learnt correspondence should send nearly all of them to multi).

The UNet and trivial baselines of the same run are reported too (the protocol trains and evaluates them anyway).
``quick=True``: one direction at 4 mm with tiny networks and a few iterations (a plumbing check). Run alone with
``python -m benchmarks.damm_gate_brats [--quick]``; ``TASK_BENCH_KEEP=DIR`` keeps the trained bundles (a killed
run resumes from their checkpoints).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.damm_gate import VARIANTS
from benchmarks.task_brats import FULL_2MM, QUICK, direction_jobs, shared_subjects
from benchmarks.task_protocol import direction_figures, run_directions
from benchmarks.timing import figure

__all__ = ["BRANCHES", "GATED", "NAME", "VARIANT", "gate_figures", "run"]

NAME = "damm_gate_brats"
#: the gate-training variant measured (the README's recommendation).
VARIANT = "conditions_gated"
#: the gated methods evaluated (:func:`damm.tasks.common.evaluation_branch` names) and their gating decision.
GATED = {"damm": "per_step", "damm_blend": "blend"}
BRANCHES = (*GATED, "uni", "multi")


def gate_figures(label: str, final: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Gated minus the better branch (brain PSNR and SSIM) for one direction, per gating decision of :data:`GATED`
    that the evaluation holds (the share of steps on multi is :func:`benchmarks.task_protocol.direction_figures`'s
    "damm fraction of steps on the multi-modal branch").

    Args:
        label: the direction's label (``"brats flair glioma -> metastasis"``).
        final: the direction's ``task_evaluation.json``.
        settings: the direction's settings (budgets and the variant's overrides go into the params).

    Returns:
        Figure records.
    """
    mean = final["mean"]
    common = {
        "direction": label,
        "variant": VARIANT,
        **{k: settings.get(k) for k in ("ae_iterations", "dm_iterations", "num_threads")},
        **VARIANTS[VARIANT],
    }
    figs = []
    for method, decision in GATED.items():
        if method not in mean:
            continue
        which = "gated" if decision == "per_step" else f"gated ({decision})"
        for metric, unit in (("psnr", "dB"), ("ssim", "")):
            uni, multi = mean["uni"]["brain"][metric], mean["multi"]["brain"][metric]
            figs.append(
                figure(
                    f"{label}: {which} minus better branch, brain {metric.upper()}",
                    mean[method]["brain"][metric] - max(uni, multi),
                    unit,
                    metric=metric,
                    method=method,
                    gate_decision=decision,
                    better_branch="uni" if uni >= multi else "multi",
                    **common,
                )
            )
    return figs


def run(quick: bool = False) -> list[dict]:
    """Measure both directions (one note figure when the shared data is absent).

    Args:
        quick: one direction, 4 mm, tiny networks, a few iterations.

    Returns:
        Figure records.
    """
    subjects = shared_subjects()
    if subjects is None:
        return [figure("damm_gate_brats: shared BraTS subjects absent, nothing measured", 0.0, "")]
    settings = {
        **(QUICK if quick else FULL_2MM),
        **VARIANTS[VARIANT],
        "dm_snapshot_fractions": [],
        "task_eval_branches": list(BRANCHES),
    }
    keep = os.environ.get("TASK_BENCH_KEEP")
    with tempfile.TemporaryDirectory() as tmp:
        jobs = direction_jobs(subjects, settings, Path(keep) if keep else Path(tmp), quick, prefix="gate_")
        results = run_directions(jobs, parallel=not quick)
    figs: list[dict[str, Any]] = []
    for res in results:
        figs += gate_figures(res["label"], res["final"], res["settings"])
        # no budget curve here (no snapshots): the "at 100 % of the budget" points would join task_brats's plots
        figs += [f for f in direction_figures(res, "brain") if "budget_fraction" not in f.get("params", {})]
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

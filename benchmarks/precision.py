"""Mixed precision (issue 9): fp32 vs bf16 autocast, channels-last, batched sampling, quality parity, targets.

Measured side by side in one run, for the demo and the paper-scale DAMM denoiser (16x16 latents):

1. **Training**: one divergence-aware step (forward, DAMM loss, backward, AdamW; built by
   :func:`benchmarks.damm_training.make_train_step`) in fp32 and bf16, with the default and the channels-last memory
   format, at several batch sizes: samples/s and achieved GFLOP/s (``torch.utils.flop_counter`` FLOPs of forward and
   backward) as a percentage of the fp32 and the bf16 matmul peak, both measured in the same run; whether bf16 and
   channels-last help.
2. **Sampling** seconds per image for DDPM-1000 and DDIM-50 (and DDIM-25 for the targets) per precision and batch
   size, through :class:`damm.inferers.DAMMInferer` (bundle sampler settings, random weights), including the encode
   of the conditions and the decode by autoencoders of the bundle's default (demo) configuration. The denoiser loop
   (``DAMMInferer.sample_latents``) is timed over its first ``k`` steps and extrapolated:
   ``T(N) = encode_decode + N * loop(k) / k`` (``extrapolated_from_steps`` = ``k`` in the params).
3. **Quality parity**: the default model (``bundle/configs/train.json`` defaults, synthetic data, same seeds) trained
   in fp32 and in bf16 (``precision`` override), each sampled in its own precision with DDIM-50 and the same seed:
   PSNR/SSIM and their difference; also the fp32 model sampled in bf16 (sampling-only parity). The fp32 model of
   :mod:`benchmarks.damm_quality` (``benchmarks/results/tmp_damm_quality/diffusion_joint``) is reused when present;
   other models are cached under ``benchmarks/results/tmp_precision/`` (delete it to retrain).
4. **Targets** of issue 9 against the official code: training throughput (>= 5x), sampling speed per image
   (>= 50x at <= 0.3 dB PSNR loss), share of the bf16 peak in the paper training step (>= 25 %).

``quick=True`` runs every part at toy size: the demo denoiser only (the targets are then computed on it: a plumbing
check, not a result), batch 2, two sampling steps, parity on a toy model in a temporary folder. Run alone with
``python -m benchmarks.precision [--quick]``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from monai.bundle import ConfigParser

from benchmarks.damm_network import make_denoiser
from benchmarks.damm_training import make_train_step, train_step_flops
from benchmarks.hardware import matmul_peak_gflops
from benchmarks.memory import peak_memory_mb
from benchmarks.official import official
from benchmarks.precision_parity import (
    COMMON_JSON,
    REPO,
    parity,
)
from benchmarks.timing import figure, time_call
from damm.inferers import DAMMInferer
from damm.model import DAMMModel
from damm.networks import DEMO_DENOISER_CONFIG, PAPER_DENOISER_CONFIG
from ddcore.precision import autocast, keep_norms_fp32

__all__ = ["NAME", "run"]

NAME = "precision"

TRAIN_JSON = REPO / "bundle" / "configs" / "train.json"
QUALITY_RECORD = REPO / "benchmarks" / "results" / "damm_quality.json"

PRECISIONS = ("fp32", "bf16")
DENOISERS = {"demo": DEMO_DENOISER_CONFIG, "paper": PAPER_DENOISER_CONFIG}
LATENT_SIZE = 16

#: Official DAMM code, paper configuration, fp32, these 2 cores: seconds to sample one image (DDPM, 1000 steps).
#: Targets of issue 9.
TARGET_TRAIN_X = 5.0
TARGET_SAMPLE_X = 50.0
TARGET_SAMPLE_PSNR_LOSS_DB = 0.3
TARGET_PEAK_PCT = 25.0
#: DDIM-N minus DDPM-1000 PSNR of the gated prediction on the trained demo model, as measured by
#: ``benchmarks.damm_quality`` (full run); replaced by the stored record when that is a full run.
DDIM_PSNR_DELTA_DB = {25: -0.04, 50: -0.07}

FULL = {
    "denoisers": ("demo", "paper"),
    "train_batches": (8, 16, 32),
    "train_repeat": 3,
    "sample_batches": (1, 8, 32),
    "sample_steps": {"demo": 10, "paper": 4},  # k of the extrapolation
    "sample_repeat": 2,
    "parity_steps": 50,
}
QUICK = {
    "denoisers": ("demo",),  # the targets are then computed on the demo net (plumbing check only)
    "train_batches": (2,),
    "train_repeat": 1,
    "sample_batches": (1, 2),
    "sample_steps": {"demo": 2, "paper": 2},
    "sample_repeat": 1,
    "parity_steps": 2,
}


# ---------------------------------------------------------------------------------------------------- helpers
def _bundle_parser(latent_channels: int) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(COMMON_JSON), str(TRAIN_JSON)])
    parser["ae_latent_channels"] = int(latent_channels)
    return parser


@contextlib.contextmanager
def _memory_format(model: torch.nn.Module, channels_last: bool) -> Iterator[None]:
    """Hold ``model`` in channels-last format inside the block (default format again afterwards)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


def _tag(precision: str, channels_last: bool) -> str:
    return precision + (" channels-last" if channels_last else "")


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ---------------------------------------------------------------------------------------------------- 1. training
def _training(
    label: str, model: torch.nn.Module, cfg: dict[str, Any], peaks: dict[str, float], common: dict[str, Any]
) -> tuple[list[dict], dict[tuple[str, bool, int], dict[str, float]]]:
    """Training-step figures of one denoiser; results keyed by ``(precision, channels_last, batch)``."""
    figs: list[dict] = []
    res: dict[tuple[str, bool, int], dict[str, float]] = {}
    batches = cfg["train_batches"]
    model.train()
    flops = train_step_flops(model)
    figs.append(
        figure(f"{label}: training-step FLOPs per sample (fwd+bwd)", flops / 1e9, "GFLOP", config=label, **common)
    )
    plot_id = f"DAMM training GFLOP/s vs matmul peaks ({label})"
    mem_batch = max(b for b in batches if b <= 16) if any(b <= 16 for b in batches) else batches[0]
    for channels_last in (False, True):
        with _memory_format(model, channels_last):
            for precision in PRECISIONS:
                tag = _tag(precision, channels_last)
                for batch in batches:
                    p = {"precision": precision, "config": label, "batch": batch, "channels_last": channels_last}
                    step = make_train_step(model, batch, precision, channels_last=channels_last)
                    med, spread = time_call(step, warmup=1, repeat=cfg["train_repeat"])
                    del step
                    gflops = flops * batch / med / 1e9
                    res[(precision, channels_last, batch)] = {"step_s": med, "gflops": gflops}
                    figs.append(
                        figure(
                            f"{label} {tag} b{batch}: training samples/s",
                            batch / med,
                            "samples/s",
                            step_s=round(med, 4),
                            step_spread_s=round(spread, 4),
                            **p,
                            **common,
                        )
                    )
                    figs.append(
                        figure(
                            f"{label} {tag} b{batch}: achieved GFLOP/s (training step)",
                            gflops,
                            "GFLOP/s",
                            pct_of_fp32_peak=round(100 * gflops / peaks["fp32"], 1),
                            pct_of_bf16_peak=round(100 * gflops / peaks["bf16"], 1),
                            **p,
                            **common,
                            plot={
                                "id": plot_id,
                                "x": batch,
                                "series": tag,
                                "xlabel": "batch",
                                "ylabel": "GFLOP/s",
                            },
                        )
                    )
                    if batch == mem_batch:
                        mem = peak_memory_mb(make_train_step(model, batch, precision, channels_last=channels_last))
                        figs.append(
                            figure(f"{label} {tag} b{batch}: peak memory of a training step", mem, "MiB", **p, **common)
                        )
    model.zero_grad(set_to_none=True)
    for precision in PRECISIONS:  # the peaks as horizontal lines of the plot
        for batch in sorted({batches[0], batches[-1]}):
            figs.append(
                figure(
                    f"{precision} matmul peak (line of the {label} plot, x={batch})",
                    peaks[precision],
                    "GFLOP/s",
                    precision=precision,
                    **common,
                    plot={"id": plot_id, "x": batch, "series": f"{precision} matmul peak", "xlabel": "batch"},
                )
            )
    for precision in PRECISIONS:
        ratios = [res[(precision, False, b)]["step_s"] / res[(precision, True, b)]["step_s"] for b in batches]
        figs.append(
            figure(
                f"{label} {precision}: channels-last speed-up of the training step (geometric mean over batches)",
                _geomean(ratios),
                "x",
                per_batch={str(b): round(r, 3) for b, r in zip(batches, ratios)},
                helps=_geomean(ratios) > 1.0,
                precision=precision,
                config=label,
                **common,
            )
        )
    for batch in batches:
        for channels_last in (False, True):
            ratio = res[("fp32", channels_last, batch)]["step_s"] / res[("bf16", channels_last, batch)]["step_s"]
            figs.append(
                figure(
                    f"{label} b{batch}{' channels-last' if channels_last else ''}: bf16 speed-up over fp32 (training)",
                    ratio,
                    "x",
                    helps=ratio > 1.0,
                    config=label,
                    batch=batch,
                    channels_last=channels_last,
                    **common,
                )
            )
    return figs, res


# ---------------------------------------------------------------------------------------------------- 2. sampling
def _truncated(inferer: DAMMInferer, steps: int) -> DAMMInferer:
    """``inferer`` running only the first ``steps`` timesteps of its schedule (for timing)."""
    make = inferer.make_sampling_scheduler

    def make_truncated() -> Any:
        sched = make()
        sched.timesteps = sched.timesteps[:steps]
        return sched

    inferer.make_sampling_scheduler = make_truncated  # type: ignore[method-assign]
    return inferer


def _sample_model(denoiser: torch.nn.Module) -> tuple[DAMMModel, DAMMInferer, int]:
    """The composite model (bundle-default autoencoders, ``denoiser``) and the bundle's inferer."""
    parser = _bundle_parser(denoiser.latent_channels)
    autoencoders = keep_norms_fp32(parser.get_parsed_content("autoencoders_def"))
    model = DAMMModel(
        autoencoders, denoiser, parser.get_parsed_content("target"), parser.get_parsed_content("conditions")
    ).eval()
    inferer = parser.get_parsed_content("train#inferer").replace(progress=False, batch_size=None, seed=0)
    image_size = LATENT_SIZE * next(iter(autoencoders.values())).downsample_factor
    return model, inferer, image_size


def _encode_decode(inferer: DAMMInferer, model: DAMMModel, images: list[torch.Tensor]) -> torch.Tensor:
    """The fixed part of sampling: encode the conditions and decode a latent batch, as ``inferer.sample`` does."""
    latents = inferer.encode_conditions(model, images)
    with torch.no_grad(), autocast(inferer.precision, latents[0].device):
        return model.autoencoders[model.target].decode_scaled(latents[0]).float()


def _sampling(
    label: str, denoiser: torch.nn.Module, cfg: dict[str, Any], common: dict[str, Any]
) -> tuple[list[dict], dict[tuple[str, str, int], dict[str, float]]]:
    """Sampling figures of one denoiser; per-image seconds keyed by ``(precision, "ddpm-1000"|"ddim-N", batch)``."""
    figs: list[dict] = []
    res: dict[tuple[str, str, int], dict[str, float]] = {}
    model, base, image_size = _sample_model(denoiser)
    k = cfg["sample_steps"][label]
    g = torch.Generator().manual_seed(0)
    n_max = max(cfg["sample_batches"])
    images = [torch.rand(n_max, 1, image_size, image_size, generator=g) * 2 - 1 for _ in model.conditions]
    plot_id = f"DAMM sampling seconds per image vs batch ({label})"
    for precision in PRECISIONS:
        for sampler in ("ddpm", "ddim"):
            steps_all = None if sampler == "ddpm" else 50
            inf = base.replace(sampler=sampler, num_inference_steps=steps_all, precision=precision)
            targets = (inf.num_train_timesteps,) if sampler == "ddpm" else (50, 25)
            for batch in cfg["sample_batches"]:
                fixed, fixed_spread = time_call(
                    lambda inf=inf, batch=batch: _encode_decode(inf, model, [im[:batch] for im in images]),
                    warmup=1,
                    repeat=cfg["sample_repeat"],
                )
                latents = inf.encode_conditions(model, [im[:batch] for im in images])
                one, many = _truncated(inf.replace(), 1), _truncated(inf.replace(), k)
                one.sample_latents(model, latents)  # warm-up
                loop, loop_spread = time_call(
                    lambda many=many, latents=latents: many.sample_latents(model, latents),
                    warmup=0,
                    repeat=cfg["sample_repeat"],
                )
                per_step = loop / k
                for steps in targets:
                    name = f"{sampler}-{steps}"
                    per_image = (fixed + steps * per_step) / batch
                    res[(precision, name, batch)] = {"per_image_s": per_image}
                    if name == "ddim-25":
                        continue  # used by the targets only
                    ref: dict[str, Any] = {}
                    if label == "paper" and sampler == "ddpm" and batch == 1 and precision == "fp32":
                        value, text = official("damm_sample_s_per_image")
                        ref = {"reference": value, "reference_label": text}
                    figs.append(
                        figure(
                            f"{label} {precision} b{batch}: {name.upper()} seconds per image (extrapolated)",
                            per_image,
                            "s",
                            **ref,
                            precision=precision,
                            config=label,
                            batch=batch,
                            channels_last=False,
                            sampler=sampler,
                            steps=steps,
                            eta=inf.eta if sampler == "ddim" else None,
                            extrapolated_from_steps=k,
                            per_step_s=round(per_step, 5),
                            per_step_spread_s=round(loop_spread / k, 5),
                            encode_decode_s=round(fixed, 5),
                            encode_decode_spread_s=round(fixed_spread, 5),
                            **common,
                            plot={
                                "id": plot_id,
                                "x": batch,
                                "series": f"{name.upper()} {precision}",
                                "xlabel": "batch",
                                "ylabel": "seconds per image",
                                "logx": True,
                                "logy": True,
                            },
                        )
                    )
    return figs, res


# ---------------------------------------------------------------------------------------------------- 4. targets
def _ddim_psnr_delta() -> tuple[dict[int, float], str]:
    """DDIM-N minus DDPM-1000 PSNR: from the stored full ``damm_quality`` record, else the recorded values."""
    label = "benchmarks.damm_quality (trained demo model, gated, DDIM-N minus DDPM-1000)"
    try:
        rec = json.loads(QUALITY_RECORD.read_text())
    except (OSError, ValueError):
        rec = {}
    if rec and not rec.get("quick"):
        psnr = {f["name"]: f["value"] for f in rec.get("figures", [])}
        ref = psnr.get("ddpm-1000 damm PSNR all")
        found = {n: psnr[f"ddim-{n} damm PSNR all"] - ref for n in (25, 50) if f"ddim-{n} damm PSNR all" in psnr}
        if ref is not None and len(found) == 2:
            return found, label + ", stored record"
    return dict(DDIM_PSNR_DELTA_DB), label + ", values recorded from its full run"


def _targets(
    label: str,
    train: dict[tuple[str, bool, int], dict[str, float]],
    sample: dict[tuple[str, str, int], dict[str, float]],
    peaks: dict[str, float],
    common: dict[str, Any],
) -> list[dict]:
    """The issue-9 targets for denoiser ``label`` (the paper-scale one in a full run; best measured setting each)."""
    figs: list[dict] = []
    batches = sorted({b for _, _, b in train})
    batch = 16 if 16 in batches else batches[-1]
    (prec, cl, _), best = min(((k, v) for k, v in train.items() if k[2] == batch), key=lambda kv: kv[1]["step_s"])
    step_s, step_label = official("damm_train_step_s_b16")
    speed = (step_s / 16) / (best["step_s"] / batch)  # per-sample throughput ratio
    figs.append(
        figure(
            f"target: {label} training throughput vs official code (best setting, batch {batch})",
            speed,
            "x",
            reference=TARGET_TRAIN_X,
            reference_label=f"issue 9 target >= {TARGET_TRAIN_X:g}x ({step_label}: {step_s} s)",
            precision=prec,
            config=label,
            channels_last=cl,
            batch=batch,
            step_s=round(best["step_s"], 4),
            holds=speed >= TARGET_TRAIN_X,
            **common,
        )
    )
    bf16_cl = min((False, True), key=lambda c: train[("bf16", c, batch)]["step_s"])
    pct = 100 * train[("bf16", bf16_cl, batch)]["gflops"] / peaks["bf16"]
    figs.append(
        figure(
            f"target: {label} bf16 training step, % of the bf16 matmul peak (batch {batch})",
            pct,
            "%",
            reference=TARGET_PEAK_PCT,
            reference_label=f"issue 9 target >= {TARGET_PEAK_PCT:g} % of the bf16 peak",
            precision="bf16",
            config=label,
            channels_last=bf16_cl,
            batch=batch,
            achieved_gflops=round(train[("bf16", bf16_cl, batch)]["gflops"], 1),
            bf16_peak_gflops=round(peaks["bf16"], 1),
            holds=pct >= TARGET_PEAK_PCT,
            **common,
        )
    )
    deltas, delta_label = _ddim_psnr_delta()
    for steps in (50, 25):
        (prec, _, b), best = min(
            ((k, v) for k, v in sample.items() if k[1] == f"ddim-{steps}"), key=lambda kv: kv[1]["per_image_s"]
        )
        sample_s, sample_label = official("damm_sample_s_per_image")
        speed = sample_s / best["per_image_s"]
        loss = -deltas[steps]
        figs.append(
            figure(
                f"target: {label} DDIM-{steps} sampling speed-up per image vs official DDPM-1000 (best setting)",
                speed,
                "x",
                reference=TARGET_SAMPLE_X,
                reference_label=f"issue 9 target >= {TARGET_SAMPLE_X:g}x at <= {TARGET_SAMPLE_PSNR_LOSS_DB} dB PSNR "
                f"loss ({sample_label}: {sample_s} s)",
                precision=prec,
                config=label,
                batch=b,
                channels_last=False,
                per_image_s=round(best["per_image_s"], 4),
                psnr_loss_db=round(loss, 3),
                psnr_loss_source=delta_label,
                holds=speed >= TARGET_SAMPLE_X and loss <= TARGET_SAMPLE_PSNR_LOSS_DB,
                **common,
            )
        )
    return figs


# ---------------------------------------------------------------------------------------------------- run
def run(quick: bool = False) -> list[dict]:
    """Measure every part (see the module docstring).

    Args:
        quick: toy sizes, one repeat, parity on a toy model in a temporary folder (well under a minute).

    Returns:
        Figure records.
    """
    torch.set_num_threads(1 if quick else max(1, min(2, torch.get_num_threads())))
    cfg = QUICK if quick else FULL
    common = {"threads": torch.get_num_threads(), "quick": quick}
    peaks = {p: matmul_peak_gflops(torch.float32 if p == "fp32" else torch.bfloat16) for p in PRECISIONS}
    figs = [figure(f"matmul peak {p}", v, "GFLOP/s", precision=p, **common) for p, v in peaks.items()]
    train_res: dict[str, Any] = {}
    sample_res: dict[str, Any] = {}
    for label in cfg["denoisers"]:
        denoiser = keep_norms_fp32(make_denoiser(DENOISERS[label]))
        f, train_res[label] = _training(label, denoiser, cfg, peaks, common)
        figs += f
        denoiser.eval()
        f, sample_res[label] = _sampling(label, denoiser, cfg, common)
        figs += f
        del denoiser
    figs += parity(quick, cfg, common)
    label = cfg["denoisers"][-1]
    figs += _targets(label, train_res[label], sample_res[label], peaks, common)
    return figs


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))

"""Missing-modality command: synthesise a subject's absent MRI modality with a trained BraTS task bundle.

``python -m damm.tasks.impute SUBJECT_DIR [--method damm|unet|copy_<cond>_<linear|histogram>] [--bundle-root DIR]
[--output-dir DIR] [--steps N] [--seed S]``

``--method`` picks the synthesis: ``damm`` (default, ``models/model.pt``), ``unet`` (the MONAI UNet baseline,
the config's ``baseline_path``, made by the bundle run id ``train_baseline``) or ``copy_<condition>_<kind>`` (a
trivial baseline: that condition's intensities mapped onto the target's, linear or histogram, from the config's
``trivial_path``, made by ``fit_trivial``; see :mod:`damm.tasks.trivial`). Every method writes the same file with
the same sidecar (its ``method`` field names it; the sampler fields are ``null`` for the baselines), and only the
chosen method's model file is read.

The bundle root (``--bundle-root``; default ``$DAMM_BUNDLE_ROOT``, else ``./bundle`` when it exists, else ``.``)
holds ``models/model.pt`` and ``models/target_intensity.json``, and its ``configs/train.json`` +
``configs/task_brats.json`` are the configs used (unless ``--config-file`` names others). A trained root without
``configs/`` (e.g. a run folder) takes the configs of the default bundle root; nothing is looked up relative to
the installed source tree, so the command works the same from a wheel and from a checkout.

The subject folder may use any naming scheme of :mod:`damm.tasks.brats_files` (BraTS 2021 ``*_t1ce``, BraTS 2023
``*-t2f``, plain ``flair.nii.gz``); the result is written under that scheme's file name for the target modality,
beside the other files (or into ``--output-dir``), as NIfTI on the subject's own voxel grid, with a JSON sidecar
(``<name>.json``: method, model checkpoint and hash, sampler, steps, seed, intensity mapping (with the range the
output is clamped to), branch statistics).

Everything is checked before the model is loaded: the source modalities exist and share one voxel grid, and the
output file does not exist. An existing file is never replaced unless ``--overwrite`` is given (the message says
whether it is a real acquisition or an earlier synthesis). The real target, if the subject has one, is never used:
intensities are mapped back with the training reference (``models/target_intensity.json``) or ``--intensity-range``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLE_ROOT_ENV",
    "CONFIG_NAMES",
    "MAKES",
    "bundle_config_files",
    "default_bundle_root",
    "impute",
    "main",
    "method_names",
]

#: environment variable naming the default bundle root.
BUNDLE_ROOT_ENV = "DAMM_BUNDLE_ROOT"
#: the configs merged, in order, from ``<bundle root>/configs``.
CONFIG_NAMES = ("common.json", "train.json", "task_brats.json")
#: how a missing model file of a method is made (bundle run id).
MAKES = {"damm": "training", "unet": "train_baseline", "copy": "fit_trivial"}


def method_names(conditions: Sequence[str]) -> list[str]:
    """The ``--method`` values for a model with these conditions.

    Args:
        conditions: the model's conditions.

    Returns:
        ``["damm", "unet", "copy_<condition>_linear", "copy_<condition>_histogram", ...]``.
    """
    from damm.tasks.trivial import KINDS

    return ["damm", "unet", *(f"copy_{c}_{k}" for c in conditions for k in KINDS)]


def default_bundle_root() -> Path:
    """``$DAMM_BUNDLE_ROOT`` when set, else ``./bundle`` when it is a folder, else the working folder.

    Returns:
        The bundle root.
    """
    env = os.environ.get(BUNDLE_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    return Path("bundle") if Path("bundle").is_dir() else Path(".")


def bundle_config_files(bundle_root: str | Path | None = None) -> tuple[str, ...]:
    """The task configs (:data:`CONFIG_NAMES`) of a bundle root: ``<bundle_root>/configs``, or, when that lacks
    them, the default bundle root's (:func:`default_bundle_root`).

    Args:
        bundle_root: the bundle root (default: :func:`default_bundle_root`).

    Returns:
        The config paths, in merge order.

    Raises:
        FileNotFoundError: no searched folder holds every config (the message names ``--bundle-root``,
            ``$DAMM_BUNDLE_ROOT`` and ``--config-file``).
    """
    roots = [Path(bundle_root).expanduser()] if bundle_root is not None else []
    roots += [r for r in (default_bundle_root(),) if r not in roots]
    for root in roots:
        files = [root / "configs" / name for name in CONFIG_NAMES]
        if all(f.is_file() for f in files):
            return tuple(str(f) for f in files)
    searched = ", ".join(str(r / "configs") for r in roots)
    raise FileNotFoundError(
        f"bundle configs {list(CONFIG_NAMES)} not found in {searched}; pass --bundle-root DIR (a bundle root whose "
        f"configs/ holds them), set {BUNDLE_ROOT_ENV}, or name the configs with --config-file"
    )


def _apply_training_record(parser: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply the preprocessing the model was trained with (``models/task_preprocessing.json``, written at
    training beside the intensity reference) to the config, except keys given in ``overrides``.

    Args:
        parser: the task's ``ConfigParser`` (``bundle_root`` and ``overrides`` already applied).
        overrides: the user's ``--set`` entries (they win).

    Returns:
        The settings applied (empty when the bundle has no record, e.g. trained by an older version).

    Raises:
        ValueError: the record cannot be read.
    """
    from damm.tasks.brats_data import preprocessing_record_path

    path = preprocessing_record_path(parser.get_parsed_content("task_reference_path"))
    if not path.is_file():
        return {}
    try:
        settings = dict(json.loads(path.read_text(encoding="utf-8"))["settings"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the training record {path}: {type(err).__name__}: {err}") from err
    applied = {k: v for k, v in settings.items() if k not in overrides}
    for key, value in applied.items():
        parser[key] = value
    return applied


def _is_synthetic(path: Path) -> bool:
    name = path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem
    sidecar = path.with_name(stem + ".json")
    try:
        return bool(json.loads(sidecar.read_text()).get("synthetic"))
    except (OSError, ValueError):
        return False


def impute(
    subject_dir: str | Path,
    bundle_root: str | Path | None = None,
    config_files: Sequence[str | Path] | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    model_path: str | Path | None = None,
    intensity_range: Sequence[float] | None = None,
    overrides: dict[str, Any] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int | None = None,
    branch: str = "damm",
    num_samples: int = 1,
    method: str = "damm",
) -> Path:
    """Synthesise the configured target modality of one subject with DAMM or a baseline.

    Args:
        subject_dir: the subject's folder.
        bundle_root: bundle root holding ``models/model.pt`` and ``models/target_intensity.json`` (default:
            :func:`default_bundle_root`).
        config_files: bundle configs, merged in order (default: :func:`bundle_config_files` of ``bundle_root``).
        output_dir: where to write (default: the subject folder).
        overwrite: replace an existing output file.
        model_path: the method's model file (default: the config's ``model_path`` for DAMM, ``baseline_path`` for
            the UNet, ``trivial_path`` (else ``<ckpt_dir>/trivial_baselines.json``) for the trivial baselines).
        intensity_range: ``(lower, upper)`` input intensities for ``-1``/``1`` (default: the training reference).
        overrides: other config entries (e.g. ``{"task_pixdim": [2, 2, 2]}``). The preprocessing the model was
            trained with (target, conditions, ``task_pixdim``, ``task_axcodes``, ``task_lower``, ``task_upper``) is
            read from ``models/task_preprocessing.json`` (written at training) and applied unless given here.
        sampler: one of :data:`damm.schedulers.SAMPLERS` (default: the config's).
        steps: sampling steps (default: the config's).
        eta: DDIM eta (default: the config's).
        seed: sampling seed (default: the config's).
        branch: ``"damm"``, ``"uni"`` or ``"multi"``.
        num_samples: K samples averaged.
        method: ``"damm"``, ``"unet"`` or ``"copy_<condition>_<linear|histogram>"`` (:func:`method_names`); the
            sampler settings apply to ``"damm"`` only.

    Returns:
        The written NIfTI path.

    Raises:
        FileNotFoundError: missing folder, configs, model (the message names the run id that makes it) or
            reference.
        FileExistsError: the output exists and ``overwrite`` is false.
        ValueError: missing source modalities, modalities not co-registered, bad settings.
    """
    from monai.bundle import ConfigParser

    from damm.tasks.brats import synthesise_to_file
    from damm.tasks.brats_files import check_subject_files, modality_filename, subject_files

    info = subject_files(subject_dir)
    bundle_root = default_bundle_root() if bundle_root is None else Path(bundle_root)
    if config_files is None:
        config_files = bundle_config_files(bundle_root)
    parser = ConfigParser()
    parser.read_config([str(c) for c in config_files])
    parser.update({"bundle_root": str(bundle_root), **dict(overrides or {})})
    _apply_training_record(parser, dict(overrides or {}))
    target = parser.get_parsed_content("target")
    conditions = list(parser.get_parsed_content("conditions"))
    if method not in method_names(conditions):
        raise ValueError(f"unknown --method {method!r}; expected one of {method_names(conditions)}")
    sampling = {"sampler": sampler, "steps": steps, "eta": eta, "seed": seed}
    given = [k for k, v in sampling.items() if v is not None]
    given += (["branch"] if branch != "damm" else []) + (["num_samples"] if int(num_samples) != 1 else [])
    if method != "damm" and given:
        raise ValueError(f"sampling settings {given} apply to --method damm only, not {method!r}")
    files = info["files"]
    missing = [k for k in conditions if k not in files]
    if missing:
        raise ValueError(
            f"subject {info['subject']!r} ({info['folder']}): missing source modalities {missing}; the model needs "
            f"{conditions} (found {sorted(files)})"
        )
    check_subject_files({k: files[k] for k in conditions}, parser.get_parsed_content("task#data").tolerance)
    out_dir = Path(output_dir) if output_dir is not None else Path(info["folder"])
    out_path = out_dir / modality_filename(info["scheme"], target, info["file_prefix"])
    if out_path.exists() and not overwrite:
        what = "an earlier synthesis" if _is_synthetic(out_path) else f"a real {target} acquisition"
        raise FileExistsError(f"{out_path} exists ({what}); refusing to overwrite it without --overwrite")
    kind = method.split("_", 1)[0]
    if model_path is None:
        model_path = _method_file(parser, kind)
    model_path = Path(model_path)
    if not model_path.is_file():
        what = {"damm": "model checkpoint", "unet": "UNet baseline", "copy": "trivial baselines"}[kind]
        raise FileNotFoundError(
            f"{what} '{model_path}' not found; make it with the bundle run id {MAKES[kind]} (python -m monai.bundle "
            f'run {MAKES[kind]} --bundle_root {bundle_root} --config_file "{[str(c) for c in config_files]}")'
        )
    if intensity_range is not None:
        lo, hi = (float(v) for v in intensity_range)
        if not hi > lo:
            raise ValueError(f"--intensity-range needs lower < upper, got {lo}, {hi}")
        reference: Any = {"lower": lo, "upper": hi}
    else:
        reference = Path(parser.get_parsed_content("task_reference_path"))
        if not reference.is_file():
            raise FileNotFoundError(
                f"intensity reference '{reference}' not found (written when the task is trained); pass "
                "--intensity-range LOWER UPPER"
            )
    task = parser.get_parsed_content("task#data")
    sidecar = {"subject": info["subject"], "naming_scheme": info["scheme"]}

    def _write(model: Any, inferer: Any, predictor: Any, name: str) -> Path:
        return synthesise_to_file(
            model,
            inferer,
            {k: files[k] for k in conditions},
            out_path,
            task,
            subject=info["subject"],
            intensity_reference=reference,
            model_path=model_path,
            extra_sidecar=sidecar,
            predictor=predictor,
            method=name,
        )

    if kind != "damm":
        return _write(None, None, _baseline_predictor(parser, method, model_path, conditions, target), method)
    from damm.model import load_model

    model = load_model(parser.get_parsed_content("network"), model_path)
    changes: dict[str, Any] = {"branch": branch, "num_samples": int(num_samples)}
    if sampler is not None:
        changes["sampler"] = sampler
        if sampler == "ddpm" and steps is None:
            changes["num_inference_steps"] = None
    if steps is not None:
        changes["num_inference_steps"] = int(steps)
    if eta is not None:
        changes["eta"] = float(eta)
    if seed is not None:
        changes["seed"] = int(seed)
    return _write(model, parser.get_parsed_content("train#inferer").replace(**changes), None, "damm")


def _method_file(parser: Any, kind: str) -> Path:
    """The default model file of a method kind (``damm``, ``unet``, ``copy``) from the config."""
    if kind == "damm":
        return Path(parser.get_parsed_content("model_path"))
    if kind == "unet":
        return Path(parser.get_parsed_content("baseline_path"))
    if "trivial_path" in parser:
        return Path(parser.get_parsed_content("trivial_path"))
    return Path(parser.get_parsed_content("ckpt_dir")) / "trivial_baselines.json"


def _baseline_predictor(parser: Any, method: str, path: Path, conditions: list[str], target: str) -> Any:
    """The predictor of a baseline method (``unet`` or ``copy_<condition>_<kind>``), read from ``path``."""
    if method == "unet":
        from damm.tasks.baseline import baseline_predictors

        batch = int(parser.get_parsed_content("eval_batch_size")) if "eval_batch_size" in parser else 32
        channels = parser.get_parsed_content("baseline_channels")
        return baseline_predictors(path, len(conditions), batch, channels=channels)["unet_baseline"]
    from damm.tasks.trivial import trivial_predictors

    return trivial_predictors(path, conditions, target=target)[method]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m damm.tasks.impute``).

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status (0 on success; errors exit with 2 and a message).
    """
    from damm.schedulers import SAMPLERS

    parser = argparse.ArgumentParser(
        prog="python -m damm.tasks.impute",
        description="Synthesise a subject's missing MRI modality (default FLAIR from T2, T1, T1c) with a trained "
        "BraTS task bundle, on the subject's own voxel grid, under its naming scheme's file name.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("subject_dir", help="subject folder (BraTS 2021, BraTS 2023 or plain file names)")
    parser.add_argument(
        "--method",
        default="damm",
        help="damm, unet (the UNet baseline) or copy_<condition>_<linear|histogram> (a trivial baseline, e.g. "
        "copy_t2_histogram)",
    )
    parser.add_argument(
        "--bundle-root",
        default=None,
        help=f"bundle root with models/model.pt and configs/ (default: ${BUNDLE_ROOT_ENV}, else ./bundle, else .)",
    )
    parser.add_argument(
        "--config-file", nargs="+", default=None, help="bundle configs, merged (default: BUNDLE_ROOT/configs/...)"
    )
    parser.add_argument("--output-dir", default=None, help="output folder (default: the subject folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")
    parser.add_argument(
        "--model",
        default=None,
        help="the method's model file (default: BUNDLE_ROOT/models/model.pt, baseline_unet.pt or "
        "trivial_baselines.json)",
    )
    parser.add_argument("--intensity-range", nargs=2, type=float, default=None, metavar=("LOWER", "UPPER"))
    parser.add_argument("--sampler", choices=SAMPLERS, default=None)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--branch", choices=("damm", "uni", "multi"), default="damm")
    parser.add_argument("--num-samples", type=int, default=1, help="K samples averaged")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides (JSON values), as in training"
    )
    args = parser.parse_args(argv)
    try:
        overrides = {}
        for item in args.set:
            if "=" not in item:
                raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            overrides[k] = _value(v)
        path = impute(
            args.subject_dir,
            args.bundle_root,
            args.config_file,
            args.output_dir,
            args.overwrite,
            args.model,
            args.intensity_range,
            overrides,
            args.sampler,
            args.steps,
            args.eta,
            args.seed,
            args.branch,
            args.num_samples,
            args.method,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

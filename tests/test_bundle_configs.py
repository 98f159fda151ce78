"""Static checks of the bundle: files, metadata schema, composition from shared parts, defaults, duplicate keys."""

from __future__ import annotations

import builtins
import importlib
import inspect
import json
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
CONFIGS = BUNDLE / "configs"

#: how every run id is launched: the shared part first, then the run's file, then overlays
DAMM_RUNS = {
    "train": ["common.json", "train.json"],
    "inference": ["common.json", "inference.json"],
    "evaluate": ["common.json", "train.json", "evaluate.json"],
    "multi_gpu": ["common.json", "train.json", "multi_gpu_train.json"],
}
DRDM_RUNS = {
    name: ["drdm_common.json", f"{name}.json"] for name in ("drdm_train", "drdm_augment", "drdm_register_pairs")
}
TASK_RUNS = {task: ["common.json", "train.json", f"task_{task}.json"] for task in ("brats", "microscopy")}
#: the bundle's defaults (task overlays choose a task's settings on top of them)
BASE_RUNS = {**DAMM_RUNS, **DRDM_RUNS}
#: the architecture and diffusion settings every DAMM run must agree on
DAMM_ARCH_KEYS = [
    "spatial_dims",
    "ae_kind",
    "ae_channels",
    "ae_latent_channels",
    "ae_num_res_blocks",
    "ae_norm_num_groups",
    "dm_channels",
    "dm_num_res_blocks",
    "dm_norm_num_groups",
    "dm_time_embed_dim",
    "dm_num_heads",
    "dm_se_reduction",
    "dm_norm",
    "confidence_source",
    "gamma",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "sampler",
    "num_inference_steps",
    "eta",
]
DRDM_SHARED_KEYS = ["spatial_dims", "in_channels", "num_timesteps", "network_def", "diffusion", "sampler_kwargs"]
#: the data keys: defined by common.json, replaced only by the task overlays
DATA_KEYS = ["target", "conditions"]
#: targets of the shared blocks (matched by their last name, so a module move does not matter)
SHARED_TARGETS = {
    "common.json": ("build_autoencoders", "DAMMDenoiser", "DAMMModel", "DDPMScheduler"),
    "drdm_common.json": ("RecoveryNet", "DeformationDiffusion"),
}


def _read(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def _parser(files: list[str], **overrides: Any) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update(overrides)
    return parser


def _targets(node: Any, path: str = "") -> list[tuple[str, dict]]:
    """Every ``_target_`` block of a config (id, block)."""
    found: list[tuple[str, dict]] = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append((path, node))
        for k, v in node.items():
            found += _targets(v, f"{path}#{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _targets(v, f"{path}#{i}")
    return found


def test_required_files_exist():
    for rel in ("LICENSE", "configs/metadata.json", "configs/logging.conf", "docs/README.md"):
        assert (BUNDLE / rel).is_file(), rel
    for files in (*BASE_RUNS.values(), *TASK_RUNS.values()):
        for name in files:
            assert (CONFIGS / name).is_file(), name
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()


def test_metadata_validates_against_vendored_schema(tmp_path):
    # verify_metadata "downloads" the schema to filepath; an existing file is used as is (offline)
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(CONFIGS / "meta_schema.json"))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    # network_data_format describes network_def itself: [x_t, z_anchor, z_aux] latents + timesteps -> noise
    common = json.loads((CONFIGS / "common.json").read_text())
    latent, n_cond = common["ae_latent_channels"], len(common["conditions"])
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == latent * (1 + n_cond)
    assert fmt["inputs"]["image"]["spatial_shape"] == [64 // 2 ** (len(common["ae_channels"]) - 1)] * 2
    assert fmt["inputs"]["timesteps"]["type"] == "timesteps" and fmt["inputs"]["timesteps"]["dtype"] == "long"
    assert fmt["inputs"]["timesteps"]["value_range"] == [0, common["num_train_timesteps"] - 1]
    assert fmt["outputs"]["pred"]["num_channels"] == latent
    assert meta["denoiser_export_data_format"]["inputs"]["image"]["num_channels"] == latent * (1 + n_cond) + 1
    assert meta["autoencoder_data_format"]["inputs"]["image"]["num_channels"] == 1


def test_metadata_schema_rejects_missing_keys(tmp_path):
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="spatial_shape"):
        verify_metadata(meta_file=str(bad), filepath=str(CONFIGS / "meta_schema.json"))


@pytest.mark.parametrize("run", sorted({**BASE_RUNS, **TASK_RUNS}))
def test_configs_parse_without_duplicate_keys(run, monkeypatch):
    files = {**BASE_RUNS, **TASK_RUNS}[run]
    monkeypatch.setenv("MONAI_FAIL_ON_DUPLICATE_CONFIG", "1")
    parser = _parser(files)
    assert "bundle_root" in parser and "device" in parser
    shared = _read(files[0])["imports"]
    assert parser["imports"][: len(shared)] == shared  # the run's "+imports" appended to the shared ones
    if len(files) > 1 and "+imports" in _read(files[1]):
        assert set(_read(files[1])["+imports"]) <= set(parser["imports"])
    if "multi_gpu_train.json" in files:
        assert "$import torch.distributed as dist" in parser["imports"]  # "+imports" appended, not replaced
        assert "$import damm.engines" in parser["imports"]


def test_shared_part_is_the_single_definition():
    """Architecture, diffusion and data keys live in common.json / drdm_common.json only: no copies to keep in step."""
    names = sorted(p.name for p in CONFIGS.glob("*.json") if p.name not in ("metadata.json", "meta_schema.json"))
    configs = {n: _read(n) for n in names}
    assert len(DAMM_ARCH_KEYS) >= 15
    damm = {n: c for n, c in configs.items() if not n.startswith("drdm_")}
    drdm = {n: c for n, c in configs.items() if n.startswith("drdm_")}
    for family, shared, keys in ((damm, "common.json", DAMM_ARCH_KEYS), (drdm, "drdm_common.json", DRDM_SHARED_KEYS)):
        for key in keys:
            assert [n for n, c in family.items() if key in c] == [shared], key
    for key in DATA_KEYS:
        assert [n for n, c in damm.items() if key in c] == ["common.json", "task_brats.json", "task_microscopy.json"]
    # the run files add to the shared part, they do not shadow any of it
    for run_files in BASE_RUNS.values():
        shared = set(configs[run_files[0]]) - {"_desc_", "imports"}
        assert not shared & set(configs[run_files[1]]), run_files
    # the network and diffusion blocks are written once
    for shared, suffixes in SHARED_TARGETS.items():
        for suffix in suffixes:
            where = [n for n, c in configs.items() for _, b in _targets(c) if b["_target_"].split(".")[-1] == suffix]
            assert where == [shared], (suffix, where)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("overrides", [{}, {"ae_channels": [8, 8, 8], "dm_channels": [8, 8, 8, 8], "dm_num_heads": 2}])
def test_train_inference_evaluate_resolve_the_same_network(overrides):
    runs = {"train": "train#inferer", "inference": "inferer", "evaluate": "train#inferer"}
    states, settings, betas = {}, {}, {}
    for run, inferer_id in runs.items():
        parser = _parser(DAMM_RUNS[run], device="$torch.device('cpu')", **overrides)
        torch.manual_seed(0)
        network = parser.get_parsed_content("network_def")
        states[run] = _state(network)
        inferer = parser.get_parsed_content(inferer_id)
        settings[run] = {k: getattr(inferer, k) for k in ("sampler", "num_inference_steps", "eta", "seed")}
        betas[run] = inferer.scheduler.betas
        assert (network.target, list(network.conditions)) == ("np_signal", ["vessel", "nuclei"])
    for run in ("inference", "evaluate"):
        _assert_same_state(states["train"], states[run])
        assert settings[run] == settings["train"], run
        torch.testing.assert_close(betas[run], betas["train"], rtol=0, atol=0)
    if overrides:
        assert states["train"]["denoiser.uni.in_conv.conv.weight"].shape[0] == 8


def test_drdm_runs_resolve_the_same_network_and_diffusion():
    states, diffusions = {}, {}
    for run, files in DRDM_RUNS.items():
        parser = _parser(files, device="$torch.device('cpu')")
        torch.manual_seed(0)
        states[run] = _state(parser.get_parsed_content("network_def"))
        diffusion = parser.get_parsed_content("diffusion")
        diffusions[run] = (type(diffusion), {k: _value(parser, v) for k, v in parser["diffusion"].items()})
    for run in DRDM_RUNS:
        _assert_same_state(states["drdm_train"], states[run])
        assert diffusions[run] == diffusions["drdm_train"], run
    # the workflows take the shared blocks by reference
    for run, holder in (("drdm_augment", "augmenter"), ("drdm_register_pairs", "synthesiser")):
        block = _read(f"{run}.json")[holder]
        assert (block["network"], block["diffusion"], block["sampler_kwargs"]) == (
            "@network_def",
            "@diffusion",
            "@sampler_kwargs",
        )
    assert _read("drdm_train.json")["train"]["trainer"]["diffusion"] == "@diffusion"


# ----------------------------------------------------------------- one source for each default: the configs
PROJECT_PACKAGES = ("damm", "drdm", "transforms", "ddcore")
#: functions whose ``**kwargs`` go to another function (a config key set on them is that function's parameter)
FORWARDS = {
    "build_autoencoders": "damm.networks.build_autoencoder",
    "build_discriminators": "damm.networks.build_discriminator",
}
#: (callable name, parameter): Python defaults that still disagree with the configs, in files of other owners.
#: Remove an entry when its default is fixed (the test fails on entries that no longer disagree).
_SAFE_NAMES = {"len", "list", "tuple", "int", "float", "str", "not", "and", "or", "is", "None", "True", "False"}
_UNKNOWN = object()


def _locate(target: str) -> Callable | None:
    module, _, name = target.rpartition(".")
    if not module.startswith(PROJECT_PACKAGES):
        return None
    return getattr(importlib.import_module(module), name)


def _value(parser: ConfigParser, value: Any, depth: int = 0) -> Any:
    """The config value when it is a literal, a reference to one or a plain expression of them; else _UNKNOWN."""
    if depth > 20:
        return _UNKNOWN
    if isinstance(value, dict):
        if "_target_" in value:
            return _UNKNOWN
        out = {k: _value(parser, v, depth + 1) for k, v in value.items()}
        return _UNKNOWN if _UNKNOWN in out.values() else out
    if isinstance(value, (list, tuple)):
        out = [_value(parser, v, depth + 1) for v in value]
        return _UNKNOWN if any(v is _UNKNOWN for v in out) else out
    if not isinstance(value, str):
        return value
    if value.startswith("@"):
        return _value(parser, parser[value[1:]], depth + 1) if value[1:] in parser else _UNKNOWN
    if value.startswith("$"):
        refs = re.findall(r"@([\w#:]+)", value)
        rest = re.sub(r"'[^']*'|\"[^\"]*\"", "", re.sub(r"@[\w#:]+", "", value[1:]))
        if not set(re.findall(r"[A-Za-z_]\w*", rest)) <= _SAFE_NAMES:
            return _UNKNOWN  # calls into the project or torch: not a default-like value
        values = {r: _value(parser, parser[r], depth + 1) if r in parser else _UNKNOWN for r in refs}
        if any(v is _UNKNOWN for v in values.values()):
            return _UNKNOWN
        expr = re.sub(r"@([\w#:]+)", lambda m: repr(values[m.group(1)]), value[1:])
        allowed = {n: getattr(builtins, n) for n in ("len", "list", "tuple", "int", "float", "str")}
        return eval(expr, {"__builtins__": allowed})
    if value.startswith("%"):
        return _UNKNOWN
    return value


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(i) for i in v]
    if isinstance(v, dict):
        return {k: _plain(i) for k, i in v.items()}
    return v


def _mismatches(files: list[str]) -> dict[tuple[str, str], str]:
    return _mismatches_in(_parser(files), "+".join(files))


def _mismatches_in(parser: ConfigParser, label: str) -> dict[tuple[str, str], str]:
    """``{(callable, parameter): message}`` for every project default that disagrees with the config."""
    found: dict[tuple[str, str], str] = {}
    for path, block in _targets(parser.get()):
        component = _locate(block["_target_"])
        if component is None:
            continue  # MONAI's and torch's own defaults are not the project's to keep
        name = component.__name__
        signature = inspect.signature(component)
        forwarded = FORWARDS.get(name)
        for key, raw in block.items():
            if key.startswith("_"):
                continue
            params = signature.parameters
            if key not in params and forwarded:
                params = inspect.signature(_locate(forwarded)).parameters
            assert key in params or any(p.kind is p.VAR_KEYWORD for p in params.values()), (path, key)
            if key not in params or params[key].default in (inspect.Parameter.empty, None):
                continue  # no default, or None: "not given / off", which a config turns on with a value
            value = _value(parser, raw)
            if value is not _UNKNOWN and _plain(params[key].default) != _plain(value):
                found[(name, key)] = f"{label} {path}: Python {params[key].default!r}, config {value!r}"
    return found


def test_python_defaults_follow_the_configs():
    """Every Python default of a parameter a config sets equals the config value, is None ("not given") or is absent."""
    found: dict[tuple[str, str], str] = {}
    for files in BASE_RUNS.values():
        found.update(_mismatches(files))
    assert not found, "\n".join(found.values())


def test_defaults_check_sees_a_disagreement():
    """The check itself: a default that disagrees with the config is reported, a matching one is not."""
    parser = ConfigParser({"a": 2, "b": "@a", "c": "$[@b] * 2 + list((1,))", "d": "$torch.ones(1)"})
    assert _value(parser, "@b") == 2 and _value(parser, "@c") == [2, 2, 1]
    assert _value(parser, "@d") is _UNKNOWN and _value(parser, {"_target_": "x"}) is _UNKNOWN
    block = {"_target_": "damm.inferers.DAMMInferer", "scheduler": "@s", "eta": "@eta", "batch_size": 4}
    block["sampler"] = "ddim"  # equal to the Python default: fine
    config = {"s": {"_target_": "monai.networks.schedulers.DDPMScheduler", "num_train_timesteps": 10}, "inf": block}
    assert _mismatches_in(ConfigParser({**config, "eta": 1.0}), "x") == {}  # batch_size has no default
    found = _mismatches_in(ConfigParser({**config, "eta": 0.5}), "x")
    assert list(found) == [("DAMMInferer", "eta")] and "Python 1.0, config 0.5" in found[("DAMMInferer", "eta")]
    # a key that is no parameter at all is an error of the config
    with pytest.raises(AssertionError):
        _mismatches_in(ConfigParser({**config, "eta": 1.0, "inf": {**block, "etta": 1.0}}), "x")


# ----------------------------------------------------------------- no dataset names in generic code
GENERIC_PACKAGES = ("damm.engines", "damm.inferers", "damm.losses", "damm.networks", "transforms", "ddcore")


def _modality_names() -> set[str]:
    names: set[str] = set()
    for files in TASK_RUNS.values():
        for name in files:
            cfg = _read(name)
            names |= {cfg["target"], *cfg["conditions"]} if "target" in cfg else set()
    return names | {"t1", "t1c", "t2", "flair", "seg"}


def _public_callables(package: str) -> list[tuple[str, Callable]]:
    root = importlib.import_module(package)
    modules = [root]
    if hasattr(root, "__path__"):
        modules += [importlib.import_module(m.name) for m in pkgutil.walk_packages(root.__path__, package + ".")]
    out = []
    for module in modules:
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj):
                out.append((f"{module.__name__}.{name}", obj.__init__))
                out += [(f"{module.__name__}.{name}.{m}", f) for m, f in vars(obj).items() if inspect.isfunction(f)]
            elif inspect.isfunction(obj):
                out.append((f"{module.__name__}.{name}", obj))
    return out


def _strings(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, (list, tuple, set, frozenset)):
        return set().union(*(_strings(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return _strings(list(value)) | _strings(list(value.values()))
    return set()


def test_generic_code_has_no_dataset_names():
    """Engines, inferers, losses, networks, transforms and the core get modality keys from the config only."""
    names = _modality_names()
    assert {"np_signal", "vessel", "nuclei", "flair", "t2", "rhodamine", "dapi"} <= names
    bad = []
    for package in GENERIC_PACKAGES:
        for qualname, fn in _public_callables(package):
            for p in inspect.signature(fn).parameters.values():
                if p.default is not inspect.Parameter.empty and _strings(p.default) & names:
                    bad.append(f"{qualname}({p.name}={p.default!r})")
    assert not bad, bad
    pipelines = importlib.import_module("transforms.pipelines")
    assert not hasattr(pipelines, "NP_KEYS") and not hasattr(pipelines, "BRATS_MODALITIES")


def test_no_machine_paths_in_bundle():
    for path in BUNDLE.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".conf"):
            text = path.read_text()
            for bad in (f"/{top}/" for top in ("tmp", "work", "root", "home")):
                assert bad not in text, f"{path}: {bad}"


@pytest.mark.parametrize(
    "files, optimizers, init_file",
    [
        (["common.json", "train.json"], ["train#optimizer", "autoencoder#optimizer"], "train.json"),
        (["drdm_common.json", "drdm_train.json"], ["optimizer"], "drdm_common.json"),
    ],
)
def test_training_uses_the_fused_optimizer_and_keeps_freed_memory(files, optimizers, init_file):
    """The speed settings of issue 17 reach the optimizers and the process set-up; false switches them off."""
    for fused in (True, False):
        parser = _parser(files, fused_optimizer=fused)
        for key in optimizers:
            opt = parser.get_parsed_content(key, instantiate=True)
            assert all(group["fused"] is fused for group in opt.param_groups), (files, key)
    init = _read(init_file)["initialize"]
    assert "$ddcore.allocator.keep_freed_memory(@cpu_keep_freed_memory)" in init
    assert _parser(files).get_parsed_content("cpu_keep_freed_memory") is True


@pytest.mark.parametrize("crop", [None, [16, 8]])
def test_autoencoder_trains_on_random_crops_of_the_set_size(tmp_path, crop):
    # the tiny synthetic dataset (32 px tiles); the crop is one window per item, the same for every modality
    parser = _parser(
        ["common.json", "train.json"],
        bundle_root=str(tmp_path),
        synthetic_args={"n": 8, "size": 32, "divergent_fraction": 0.3, "seed": 0},
        ae_crop_size=crop,
    )
    dataset = parser.get_parsed_content("autoencoder#dataset")
    whole = parser.get_parsed_content("autoencoder#validate#dataset")  # validation: whole items
    keys = parser.get_parsed_content("modalities")
    item = dataset[0]
    shape = tuple(item[keys[0]].shape[1:])
    assert shape == (tuple(crop) if crop else (32, 32))
    assert all(tuple(item[k].shape[1:]) == shape for k in keys)
    if crop:
        ref = whole.transform(dict(dataset.data[0]))  # the same item uncropped (deterministic preprocessing)
        windows = {
            (y, x)
            for y in range(32 - crop[0] + 1)
            for x in range(32 - crop[1] + 1)
            if torch.equal(
                torch.as_tensor(ref[keys[0]])[:, y : y + crop[0], x : x + crop[1]], torch.as_tensor(item[keys[0]])
            )
        }
        assert windows, "the crop is a window of the item"
        y, x = sorted(windows)[0]
        for k in keys[1:]:
            assert torch.equal(torch.as_tensor(ref[k])[:, y : y + crop[0], x : x + crop[1]], torch.as_tensor(item[k]))


@pytest.mark.parametrize("crop", [None, [32, 16]])
def test_denoiser_trains_on_latent_windows_of_the_set_size(tmp_path, crop):
    # dm_crop_size is in image pixels; the window on the latents is that over the autoencoder's downsampling
    parser = _parser(["common.json", "train.json"], bundle_root=str(tmp_path), dm_crop_size=crop)
    cropper = parser.get_parsed_content("train#dataset").latent_transform
    if crop is None:
        assert cropper is None
        return
    down = 2 ** (len(parser.get_parsed_content("ae_channels")) - 1)
    assert list(cropper.cropper.roi_size) == [c // down for c in crop] and not cropper.cropper.random_size
    assert list(cropper.keys) == list(parser.get_parsed_content("modalities"))


def test_bad_denoiser_crop_size_is_one_line_naming_the_setting(tmp_path):
    parser = _parser(["common.json", "train.json"], bundle_root=str(tmp_path), dm_crop_size=[12, 16])
    with pytest.raises(Exception) as info:  # MONAI wraps the expression's error; the CLI prints the cause
        parser.get_parsed_content("train#dataset")
    cause = info.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, ValueError)
    assert str(cause) == "dm_crop_size: expected positive multiples of 16 image pixels, got [12, 16]"

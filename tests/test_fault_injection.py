"""Fault injection: the main job (``monai.bundle run training``) killed with SIGKILL at 11 points, then rerun.

Each scenario runs the tiny main job in its own folder under a runner (this file run as a script) that sends
SIGKILL to its own process at a chosen point: the N-th call of a function, optionally only for calls whose first
argument matches a pattern (e.g. the ``fsync`` of a checkpoint's temporary file: written, not yet renamed). One
more scenario kills at a random moment. The plain command is then rerun, and the test asserts: the killed run
did die by SIGKILL (the point was reached), the rerun completes, no temporary file or folder is left anywhere,
every ``.pt`` loads with ``torch.load(weights_only=True)``, and ``evaluation.json`` equals the uninterrupted
run's (every value except wall-clock seconds), i.e. the resume is exact.

Selected with ``-m fault_injection`` (skipped otherwise; about 4 minutes on 2 cores):
``python -m pytest -q -p no:cacheprovider -m fault_injection tests/test_fault_injection.py``.
"""

from __future__ import annotations

import json
import os
import random
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddcore.atomic import is_temporary

pytestmark = pytest.mark.fault_injection

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TINY = [
    "--ae_channels", "[8,8,8]", "--dm_channels", "[8,8,8,8]", "--dm_time_embed_dim", "16",
    "--synthetic_args", "{'n': 24, 'size': 32, 'divergent_fraction': 0.3, 'seed': 0}",
    "--ae_iterations", "8", "--ae_batch_size", "4", "--ae_adversarial_start_iteration", "0", "--ae_val_interval", "1",
    "--dm_iterations", "12", "--dm_batch_size", "4", "--dm_divergence_aware_start_iteration", "3",
    "--num_inference_steps", "3", "--eval_num_samples", "2", "--eval_ddpm_items", "2", "--eval_batch_size", "8",
    "--progress", "False",
]  # fmt: skip

#: (name, function to patch "module:Class.attr", which call kills (1-based), pattern the first argument must match)
POINTS = [
    ("data_generation", "data_prep.synthetic_np:_write_png16", 40, None),
    ("stage1_first_iteration", "damm.engines.autoencoder_trainer:AutoencoderTrainer._iteration", 1, None),
    ("stage1_epoch2", "damm.engines.autoencoder_trainer:AutoencoderTrainer._iteration", 6, None),
    ("stage1_checkpoint_save", "ddcore.atomic:fsync_path", 2, r"autoencoder_checkpoints/\.checkpoint_epoch="),
    ("stage1_export", "ddcore.atomic:fsync_path", 1, r"/\.model_autoencoder\."),
    ("stage2_first_iteration", "damm.engines.diffusion_trainer:DAMMDiffusionTrainer._iteration", 1, None),
    ("stage2_checkpoint_save", "ddcore.atomic:fsync_path", 2, r"diffusion_checkpoints/\.checkpoint_epoch="),
    ("stage2_epoch3", "damm.engines.diffusion_trainer:DAMMDiffusionTrainer._iteration", 10, None),
    ("evaluation", "damm.evaluation:per_item_metrics", 2, None),
    ("montage_writing", "ddcore.atomic:fsync_path", 1, r"/\.montage\."),
]


def _command(root: Path) -> list[str]:
    return [
        "run", "training",
        "--config_file", str([str(CONFIGS / "common.json"), str(CONFIGS / "train.json")]),
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(root), "--dataset_dir", str(root / "data"),
        *TINY,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(root: Path, point: tuple | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "monai.bundle"]
    if point is not None:
        _, target, n, pattern = point
        prefix = [sys.executable, __file__, target, str(n), pattern or ""]
    return subprocess.run(
        [*prefix, *_command(root)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def _evaluation(root: Path) -> dict:
    data = json.loads((root / "eval" / "evaluation.json").read_text())
    return {k: v for k, v in _flat(data) if not re.search(r"seconds", k)}


def _check_finished(root: Path, reference: dict) -> None:
    leftovers = [p for p in root.rglob("*") if is_temporary(p)]
    assert not leftovers, f"temporary files left: {leftovers}"
    checkpoints = sorted(root.rglob("*.pt"))
    assert checkpoints
    for path in checkpoints:
        torch.load(path, map_location="cpu", weights_only=True)
    for folder in ("autoencoder_checkpoints", "diffusion_checkpoints"):
        assert len(list((root / "models" / folder).glob("checkpoint_*.pt"))) == 1, folder  # n_saved = 1
    got = _evaluation(root)
    diff = [k for k in reference if got.get(k) != reference[k]]
    assert not diff, f"{len(diff)} of {len(reference)} evaluation values differ, e.g. " + ", ".join(
        f"{k}: {got.get(k)} vs {reference[k]}" for k in diff[:5]
    )


@pytest.fixture(autouse=True)
def _selected(request):
    if "fault_injection" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("fault-injection suite: run with -m fault_injection")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, float]:
    root = tmp_path_factory.mktemp("uninterrupted")
    t0 = time.perf_counter()
    proc = _run(root)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _evaluation(root), seconds


@pytest.mark.parametrize("point", POINTS, ids=[p[0] for p in POINTS])
def test_kill_then_resume(point, reference, tmp_path):
    """SIGKILL at a named point, rerun: completes exactly as the uninterrupted run, no leftovers."""
    killed = _run(tmp_path, point)
    assert killed.returncode == -signal.SIGKILL, f"the kill point was not reached:\n{killed.stderr[-3000:]}"
    rerun = _run(tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _check_finished(tmp_path, reference[0])


def test_kill_at_random_moments(reference, tmp_path):
    """Two SIGKILLs at random moments of the run (seeded), then a rerun: same numbers, no leftovers."""
    rng = random.Random(18)
    env = _env()
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "monai.bundle", *_command(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 0.9) * reference[1])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rerun = _run(tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _check_finished(tmp_path, reference[0])


def _kill_runner(argv: list[str]) -> None:
    """``python tests/test_fault_injection.py module:attr N PATTERN <monai.bundle arguments>``."""
    import importlib

    target, n, pattern, rest = argv[0], int(argv[1]), argv[2], argv[3:]
    module_name, attr = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        first = args[1] if path and len(args) > 1 else (args[0] if args else None)
        if not pattern or re.search(pattern, str(first)):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    sys.argv = ["monai.bundle", *rest]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _kill_runner(sys.argv[1:])

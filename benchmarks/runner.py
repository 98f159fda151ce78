"""Discover benchmark modules, run them, and store their figures as JSON.

A benchmark module is any ``benchmarks/<name>.py`` that defines ``NAME`` and ``run(quick: bool)``.
Each module runs in its own subprocess, so a crash or a memory spike in one cannot take the others down,
and peak memory (``ru_maxrss``) is attributable to one benchmark.
"""

from __future__ import annotations

import ast
import datetime as _dt
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ddcore.allocator import keep_freed_memory
from ddcore.atomic import atomic_write_json

__all__ = ["discover", "environment", "run_all", "run_one"]

BENCH_DIR = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__init__", "__main__", "runner", "report", "timing"}


def discover() -> dict[str, str]:
    """Map benchmark ``NAME`` -> module name, found by parsing ``benchmarks/*.py`` (no import).

    Returns:
        Ordered mapping, ``hardware`` first.
    """
    found: dict[str, str] = {}
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.stem in NOT_BENCHMARKS or path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        name = None
        has_run = False
        for node in tree.body:
            is_name = isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "NAME" for t in node.targets
            )
            if is_name and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                name = node.value.value
            if isinstance(node, ast.FunctionDef) and node.name == "run":
                has_run = True
        if name and has_run:
            found[name] = f"benchmarks.{path.stem}"
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "hardware", kv[0])))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=BENCH_DIR, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _bf16_units() -> list[str]:
    """The bf16 matrix / vector features this CPU advertises (``amx_bf16``, ``avx512_bf16``), if any."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted({f for f in flags if f in ("amx_bf16", "amx_tile", "avx512_bf16")})


def environment() -> dict[str, Any]:
    """Describe the machine and library versions the figures were measured with.

    Returns:
        JSON-serialisable dict.
    """
    import monai
    import numpy
    import torch

    from benchmarks.hardware import matmul_peak_gflops
    from benchmarks.official import cpu_model

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "cpu": cpu_model(),
        "cpu_bf16_units": _bf16_units(),
        "matmul_peak_gflops": {
            "fp32": round(matmul_peak_gflops(torch.float32, n=1024, repeat=3), 1),
            "bf16": round(matmul_peak_gflops(torch.bfloat16, n=1024, repeat=3), 1),
        },
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def run_one(name: str, module: str, quick: bool) -> dict[str, Any]:
    """Run one benchmark module in-process and return its result record.

    Args:
        name: benchmark NAME.
        module: importable module path.
        quick: pass-through to ``run``.

    The process keeps freed memory for reuse (:func:`ddcore.allocator.keep_freed_memory`), as every bundle run does
    by default (``cpu_keep_freed_memory``), so the timings are those of the bundle's settings; the record says so
    (``keep_freed_memory``).

    Returns:
        ``{"name", "quick", "seconds", "peak_rss_mb", "figures"}``; ``"error"`` instead of figures on failure.
    """
    t0 = time.perf_counter()
    record: dict[str, Any] = {"name": name, "module": module, "quick": quick}
    record["keep_freed_memory"] = keep_freed_memory(True)
    try:
        figures = importlib.import_module(module).run(quick=quick)
        record["figures"] = figures
    except Exception as exc:  # a failing benchmark is reported, not fatal for the others
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["figures"] = []
    record["seconds"] = time.perf_counter() - t0
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def run_all(out_dir: Path, quick: bool = False, only: list[str] | None = None) -> list[Path]:
    """Run the selected benchmarks, each in a subprocess, writing ``<out_dir>/<NAME>.json``.

    Args:
        out_dir: results folder.
        quick: small sizes and few repeats (the whole suite in a few minutes).
        only: benchmark NAMEs to run (default: all).

    Returns:
        Paths of the JSON files written.

    Raises:
        ValueError: an unknown name in ``only``.
    """
    available = discover()
    names = only if only else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {sorted(available)}")
    env = environment()
    written = []
    for name in names:
        print(f"[benchmarks] {name} ({'quick' if quick else 'full'}) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            rec_file = Path(tmp) / "record.json"
            cmd = [sys.executable, "-m", "benchmarks", "_one", name, available[name], str(rec_file)]
            proc = subprocess.run(
                cmd + (["--quick"] if quick else []), cwd=BENCH_DIR.parent, stderr=subprocess.PIPE, text=True
            )
            if proc.returncode == 0 and rec_file.exists():
                record = json.loads(rec_file.read_text())
            else:
                tail = (proc.stderr or "")[-2000:]
                record = {"name": name, "module": available[name], "quick": quick, "figures": [], "error": tail}
        record["environment"] = env
        path = atomic_write_json(record, out_dir / f"{name}.json")
        status = "error" if record.get("error") else f"{len(record['figures'])} figures"
        print(f"[benchmarks] {name}: {status} in {record.get('seconds', float('nan')):.1f} s", flush=True)
        written.append(path)
    return written

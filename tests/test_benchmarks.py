"""The benchmark runner produces well-formed records and a report (timings themselves are never asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks.report import write_report
from benchmarks.runner import discover
from data_prep.shared import REPO_ROOT


def test_every_benchmark_module_is_discovered():
    found = discover()
    assert next(iter(found)) == "hardware"
    for name, module in found.items():
        assert module.startswith("benchmarks.") and name


def test_quick_run_writes_records_and_report(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "hardware", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "hardware.json").read_text())
    assert record["quick"] is True and "error" not in record
    assert {"cpu", "torch", "monai", "git_commit"} <= set(record["environment"])
    units = {f["unit"] for f in record["figures"]}
    assert units == {"GFLOP/s"} and all(f["value"] > 0 for f in record["figures"])
    report = (out / "RESULTS.md").read_text()
    assert report.startswith("# Benchmark results") and "## Summary" in report and "## hardware" in report
    assert re.search(r"\| matmul \d+x\d+ fp32 \| [\d.,]+ \|", report)


def test_report_summary_ratios_and_plots(tmp_path):
    from benchmarks.timing import figure

    figs = [
        figure("fwd", 2.0, "s", reference=8.0, reference_label="official", plot={"id": "t", "x": 1, "series": "a"}),
        figure("fwd2", 3.0, "s", plot={"id": "t", "x": 2, "series": "a"}),
    ]
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "x.json").write_text(json.dumps({"name": "x", "figures": figs, "environment": {}}))
    report = write_report(tmp_path / "res", tmp_path / "R.md").read_text()
    assert "| fwd | 2.000 s | 8.000 s | 0.250× | official |" in report
    assert (tmp_path / "plots" / "t.png").stat().st_size > 1000


def test_every_benchmark_module_imports():
    """A renamed helper must not break a benchmark silently (damm_training once imported a removed name)."""
    import importlib

    for module in discover().values():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "run", None)), f"{module} has no run()"


def test_a_failing_benchmark_fails_the_run(tmp_path, monkeypatch):
    """An error record makes ``python -m benchmarks run`` exit non-zero (and so fails this suite)."""
    from benchmarks import __main__ as cli
    from ddcore.atomic import atomic_write_json

    def fake_run_all(out, quick=False, only=None):
        return [
            atomic_write_json(
                {"name": "x", "figures": [], "error": "ImportError: boom", "environment": {}}, out / "x.json"
            )
        ]

    monkeypatch.setattr(cli, "run_all", fake_run_all)
    assert cli.main(["run", "--out", str(tmp_path)]) == 1
    assert "## x" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.benchmark_quick_run
@pytest.mark.parametrize("name", list(discover()))
def test_quick_run_of_every_benchmark_has_no_error(tmp_path, name):
    """Every benchmark module runs in quick mode without an error record (CI runs this; ``-k NAME`` runs one)."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", name, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    errors = {p.stem: json.loads(p.read_text()).get("error") for p in out.glob("*.json")}
    assert proc.returncode == 0 and not any(errors.values()), (proc.stderr[-3000:], errors)
    assert (out / f"{name}.json").is_file(), f"no record for {name}: {proc.stderr[-3000:]}"


def test_official_reference_prefers_the_same_machine_and_says_when_it_cannot():
    from benchmarks.official import OFFICIAL, official

    value, label = official("damm_train_step_s_b16", cpu="AMD EPYC 7B13")
    assert value == 5.67 and "AMD EPYC" in label and "not comparable" not in label
    value, label = official("damm_train_step_s_b16", cpu="Intel(R) Xeon(R) Platinum 8481C")
    assert value == 5.20 and "AMX" in label and "not comparable" not in label
    value, label = official("drdm_forward_2d_256_b8_t79_s", cpu="AMD EPYC 7B13")  # measured on the Xeon only
    assert value == 0.070 and label.endswith("measured on another machine: ratio not comparable")
    value, label = official("damm_params_used", cpu="anything")  # machine-independent
    assert value == 111_457_617 and "not comparable" not in label
    with pytest.raises(KeyError, match="no official reference"):
        official("nope")
    for key, refs in OFFICIAL.items():
        timed = [r for r in refs if r.unit == "s"]
        assert all(r.machine and r.date and r.cpu_match for r in timed), key  # every timing names its machine


def test_records_name_the_cpu_and_its_measured_peaks():
    from benchmarks.runner import environment

    env = environment()
    assert env["cpu"] and isinstance(env["cpu_bf16_units"], list)
    assert env["matmul_peak_gflops"]["fp32"] > 0 and env["matmul_peak_gflops"]["bf16"] > 0


def test_generated_tables_match_their_records():
    """Every quality table of README and the docs is the one its committed record gives."""
    from benchmarks import tables

    blocks = [
        m.group("name") for doc in tables.DOCUMENTS if doc.is_file() for m in tables.BLOCK.finditer(doc.read_text())
    ]
    assert {"main_job", "task_brats", "task_targets"} <= set(blocks)
    assert tables.check() == [], "stale generated tables: run python -m benchmarks tables"


def test_a_table_that_disagrees_with_its_record_is_caught(tmp_path, monkeypatch):
    from benchmarks import tables

    doc = tmp_path / "doc.md"
    good = "<!-- generated:main_job -->\n" + tables.render("main_job") + "<!-- /generated:main_job -->\n"
    doc.write_text("intro\n" + good)
    monkeypatch.setattr(tables, "DOCUMENTS", (doc,))
    assert tables.check() == []
    assert "| damm (gated) | " in good
    doc.write_text("intro\n" + good.replace("| damm (gated) | ", "| damm (gated) | 9"))  # a hand-edited figure
    assert tables.check() and "main_job" in tables.check()[0]
    assert tables.update() == [doc] and tables.check() == []


def test_equal_deformation_rule_of_the_drdm_speed_up():
    """The DRDM speed-up is only recorded at equal deformation: mean and p99 |φ| within 5 %, folding not higher."""
    from benchmarks._drdm_equal import matches

    ref = {"mean_pct": 3.0, "p99_pct": 8.0, "folding_pct": 0.1}
    assert matches(ref, {"mean_pct": 3.147, "p99_pct": 7.61, "folding_pct": 0.1})  # +4.9 %, -4.9 %, equal folding
    assert matches(ref, {"mean_pct": 2.9, "p99_pct": 8.2, "folding_pct": 0.0})  # less folding is fine
    assert not matches(ref, {"mean_pct": 3.16, "p99_pct": 8.0, "folding_pct": 0.0})  # mean +5.3 %
    assert not matches(ref, {"mean_pct": 3.0, "p99_pct": 7.5, "folding_pct": 0.0})  # p99 -6.25 %
    assert not matches(ref, {"mean_pct": 3.0, "p99_pct": 8.0, "folding_pct": 0.11})  # more folding
    assert not matches({**ref, "mean_pct": 0.0}, {"mean_pct": 0.0, "p99_pct": 8.0, "folding_pct": 0.0})  # undefined

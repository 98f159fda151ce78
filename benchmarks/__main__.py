"""``python -m benchmarks run [--quick] [--only NAME ...] [--out DIR] [--report FILE]``.

Runs the benchmark modules (each in a subprocess), writes one JSON record per benchmark and regenerates the
markdown report with its plots and the generated tables of README and the docs (:mod:`benchmarks.tables`); exits
1 when any benchmark recorded an error. ``python -m benchmarks list`` shows what is available;
``python -m benchmarks tables [--check]`` rewrites (or checks) the generated tables from the committed records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.report import write_report
from benchmarks.runner import BENCH_DIR, discover, run_all, run_one
from ddcore.atomic import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run benchmarks and regenerate the report")
    run_p.add_argument("--quick", action="store_true", help="small sizes, few repeats (a few minutes in all)")
    run_p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    run_p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    run_p.add_argument("--report", type=Path, default=None, help="markdown report (default benchmarks/RESULTS.md)")
    sub.add_parser("list", help="list available benchmarks")
    tables_p = sub.add_parser("tables", help="rewrite the generated tables of README and the docs from the records")
    tables_p.add_argument("--check", action="store_true", help="only check; exit 1 when a table is stale")
    one = sub.add_parser("_one", help=argparse.SUPPRESS)
    one.add_argument("name")
    one.add_argument("module")
    one.add_argument("record")
    one.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "list":
        print(json.dumps(discover(), indent=2))
        return 0
    if args.command == "tables":
        from benchmarks import tables

        if args.check:
            stale = tables.check()
            for item in stale:
                print(f"[benchmarks] stale generated table: {item} (run python -m benchmarks tables)", file=sys.stderr)
            return 1 if stale else 0
        for path in tables.update():
            print(f"[benchmarks] rewrote {path}")
        return 0
    if args.command == "_one":
        atomic_write_json(run_one(args.name, args.module, args.quick), args.record)
        return 0
    out = args.out or BENCH_DIR / "results"
    report = args.report or (BENCH_DIR / "RESULTS.md" if args.out is None else out / "RESULTS.md")
    try:
        written = run_all(out, quick=args.quick, only=args.only)
    except ValueError as exc:
        parser.error(str(exc))
    path = write_report(out, report)
    print(f"[benchmarks] report: {path}")
    if args.out is None and not args.quick:  # the committed records changed: regenerate the tables built on them
        from benchmarks import tables

        for doc in tables.update():
            print(f"[benchmarks] rewrote {doc}")
    failed = [p.stem for p in written if json.loads(p.read_text()).get("error")]
    if failed:  # a benchmark that errors fails the run (and the test suite that runs it)
        print(f"[benchmarks] FAILED: {', '.join(failed)} (see the 'error' field of their records)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench` (`make bench`): every figure beside its baseline, as a table and as JSON.

    python -m bench                       the full spec (over 10 minutes on 2 cores)
    python -m bench --only parse,upsert   some sections only
    python -m bench --quick               smaller inputs, fewer runs: for development only

Sections: parse, upsert, upload (throughput, latency and the gateway's RSS growth), harvest,
list_projects (paging ListProjects), watch_fanout (WatchProjects to 1,000 streams) and
batches (UploadPages against single Uploads, WatchStatus latency) and polite_efficiency (the
share of a 20 requests/s budget the fleet uses).
The table goes to stdout, progress to stderr, the figures to bench/results.json and what the
run was (machine, runs, sections) to bench/results.meta.json. A run of less than the full spec
(--only, --quick or fewer than 5 runs) writes bench/results.partial.json instead, so it never
replaces a full run's figures.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from bench.common import MIN_RUNS, Options, Section, say
from bench.report import (
    PARTIAL_RESULTS_PATH,
    RESULTS_PATH,
    Figure,
    describe_machine,
    machine,
    meta_path,
    table,
    write_json,
)
from bench.services import ServiceMissing

SECTIONS = (
    "parse",
    "upsert",
    "upload",
    "observability",
    "harvest",
    "list_projects",
    "watch_fanout",
    "batches",
    "polite_efficiency",
)


def _section(name: str) -> Section:
    module = importlib.import_module(f"bench.{name}")
    run: Section = module.run
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer runs")
    parser.add_argument(
        "--runs", type=int, default=None, help=f"measured runs per side (default {MIN_RUNS})"
    )
    args = parser.parse_args(argv)
    chosen = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    runs = args.runs if args.runs is not None else (3 if args.quick else MIN_RUNS)
    if runs < 1:
        parser.error("--runs must be at least 1")
    options = Options(runs=runs, quick=args.quick)
    full = set(chosen) == set(SECTIONS) and not args.quick and runs >= MIN_RUNS
    path = RESULTS_PATH if full else PARTIAL_RESULTS_PATH
    kind = "the full spec" if full else "partial: not the full spec"

    info = machine()
    started = time.monotonic()
    say(
        f"bench on {describe_machine(info)}; sections {', '.join(chosen)}, {runs} runs each"
        f"{', quick' if args.quick else ''} ({kind})"
    )
    figures: list[Figure] = []
    failed: list[str] = []
    skipped: list[str] = []
    for name in SECTIONS:
        if name not in chosen:
            continue
        section_started = time.monotonic()
        say(f"== {name}")
        try:
            figures += _section(name)(options)
        except ServiceMissing as exc:
            say(f"== {name} skipped: {exc}")
            skipped.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        say(f"== {name} took {time.monotonic() - section_started:.0f} s")
    duration = time.monotonic() - started
    write_json(
        figures,
        {
            "machine": info,
            "duration_seconds": round(duration, 1),
            "runs": runs,
            "quick": args.quick,
            "full_spec": full,
            "sections": list(chosen),
            "failed_sections": failed,
            "skipped_sections": skipped,
        },
        path,
    )
    print(
        f"\nBenchmarks on {describe_machine(info)}; {duration:.0f} s in all; "
        f"median of {runs} runs{', quick inputs' if args.quick else ''} ({kind})\n"
    )
    print(table(figures))
    print(f"\nwritten to {path} (and {meta_path(path).name})")
    if skipped:
        print(f"sections skipped for a missing service: {', '.join(skipped)}", file=sys.stderr)
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr)
    # Not a test: a missed target is reported, not an error. A section that broke is one.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

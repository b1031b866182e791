"""Figures, the table `make bench` prints, and `bench/results.json`.

A figure pairs our median with its baseline's median from the same run; its ratio is oriented so
that higher is better (a rate divides ours by the baseline, a time divides the baseline by ours).
Most targets are on the ratio; a few (p99 latency) are on our own value, which `target_on` says.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RESULTS_PATH = Path(__file__).with_name("results.json")
# Where a run of some sections, fewer runs or --quick writes, so it never replaces the figures
# of a full run.
PARTIAL_RESULTS_PATH = Path(__file__).with_name("results.partial.json")


@dataclass
class Figure:
    name: str
    ours: float
    baseline: float
    unit: str
    # True for rates (more is better), False for times (less is better).
    higher_is_better: bool
    target: float | None = None
    target_on: Literal["ratio", "ours"] = "ratio"
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.ours / self.baseline if self.baseline else float("inf")
        return self.baseline / self.ours if self.ours else float("inf")

    @property
    def passed(self) -> bool | None:
        if self.target is None or not math.isfinite(self.ratio):
            return None  # no target, or a baseline of 0: nothing to judge by
        if self.target_on == "ratio":
            return self.ratio >= self.target
        return self.ours >= self.target if self.higher_is_better else self.ours <= self.target

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        if self.target_on == "ratio":
            return f">= {self.target:g}x"
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g} {self.unit}"

    def as_json(self) -> dict[str, Any]:
        return {
            "ours": self.ours,
            "baseline": self.baseline,
            "ratio": self.ratio if math.isfinite(self.ratio) else None,
            "target": self.target,
            "unit": self.unit,
            "target_on": self.target_on,
            "pass": self.passed,
            "note": self.note,
            "samples": self.samples,
        }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def _number(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def table(figures: Sequence[Figure]) -> str:
    headers = ("figure", "ours", "baseline", "ratio", "target", "pass/fail")
    rows = [
        (
            f.name,
            f"{_number(f.ours)} {f.unit}",
            f"{_number(f.baseline)} {f.unit}",
            f"{f.ratio:.2f}x" if f.ratio >= 0.1 else f"{f.ratio:.2g}x",
            f.target_text,
            {True: "pass", False: "FAIL", None: "-"}[f.passed],
        )
        for f in figures
    ]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    notes = [f"- {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(out + (["", *notes] if notes else []))


def machine() -> dict[str, Any]:
    """What this ran on: the numbers a reader needs to weigh the absolute figures."""
    model = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for text in Path("/proc/meminfo").read_text().splitlines():
            if text.startswith("MemTotal:"):
                memory = int(text.split()[1]) * 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "memory_gib": round(memory / 2**30, 1),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "load_average_at_start": os.getloadavg(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    return (
        f"{info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB RAM, "
        f"Python {info['python']} on {info['system']}"
    )


def meta_path(path: Path) -> Path:
    """Where the run's metadata goes beside `path`: results.json -> results.meta.json."""
    return path.with_suffix(".meta.json")


def write_json(figures: Sequence[Figure], meta: dict[str, Any], path: Path) -> None:
    """`path`: one object per figure, keyed by its name and nothing else; what the run was (the
    machine, runs, sections, duration) goes to `meta_path(path)`."""
    for target, document in (
        (path, {f.name: f.as_json() for f in figures}),
        (meta_path(path), meta),
    ):
        target.write_text(
            json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        )

"""What every benchmark shares: options, interleaved runs, and output the reader can follow.

Ours and its baseline run in turns (ours, baseline, ours, baseline, ...) after one warm-up
each, so a burst of load from someone else on the machine hits both sides alike; each figure is
the median of its measured runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.report import Figure

MIN_RUNS = 5


@dataclass(frozen=True)
class Options:
    runs: int = 5  # measured runs per side, after one warm-up
    quick: bool = False  # smaller inputs, for development; the default is the full spec


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def interleaved(runs: int, sides: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """One warm-up of each side, then `runs` measured runs of each, in turns; the samples."""
    for name, run in sides.items():
        run()
        say(f"  warm-up {name} done")
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for index in range(runs):
        for name, run in sides.items():
            samples[name].append(run())
        shown = ", ".join(f"{name} {values[-1]:.4g}" for name, values in samples.items())
        say(f"  run {index + 1}/{runs}: {shown}")
    return samples


Section = Callable[[Options], list[Figure]]

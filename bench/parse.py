"""`parse_cpu_1000`: CPU time to parse one 1,000-item listing page into items.

Ours is `worker.parse.parse_listing`, once with each parser (`SOURCE_PARSER`:
`parse_cpu_1000` is BeautifulSoup's, `parse_cpu_1000_lxml` lxml's); the baseline BeautifulSoup
on html.parser with the same selectors. Beside it: ours against raw lxml (parse plus hand-written
XPath, the practical floor) and against BeautifulSoup on lxml with plain `select()` calls (what
our own selector handling is worth), for both parsers.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from bench import data
from bench.common import Options, interleaved, say
from bench.reference_parsers import parse_with_bs4, parse_with_lxml
from bench.report import Figure, median
from worker.parse import ProjectItem, parse_listing

ITEMS = 1000
PARSES_PER_RUN = 2


def _cpu_ms(parse: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        gc.collect()
        started = time.process_time()
        for _ in range(PARSES_PER_RUN):
            parse()
        return (time.process_time() - started) * 1000 / PARSES_PER_RUN

    return run


def run(options: Options) -> list[Figure]:
    body = data.listing(1, ITEMS)
    url = data.page_url(1)
    profile = data.PROFILE

    def ours() -> list[ProjectItem]:
        return parse_listing(body, url, profile).items

    def ours_lxml() -> list[ProjectItem]:
        return parse_listing(body, url, profile, None, "lxml").items

    sides: dict[str, Callable[[], list[ProjectItem]]] = {
        "ours": ours,
        "ours lxml": ours_lxml,
        "bs4 html.parser": lambda: parse_with_bs4(body, url, profile, "html.parser"),
        "bs4 lxml": lambda: parse_with_bs4(body, url, profile, "lxml"),
        "raw lxml": lambda: parse_with_lxml(body, url, profile),
    }
    expected = ours()
    assert len(expected) == ITEMS, len(expected)
    for name, parse in sides.items():
        assert parse() == expected, f"{name} reads the page differently from ours"
    say(f"parse: {len(body):,}-byte page of {ITEMS} items, {PARSES_PER_RUN} parses per run")
    samples = interleaved(options.runs + 2, {k: _cpu_ms(v) for k, v in sides.items()})

    def figure(name: str, side: str, target: float | None, note: str, ours: str = "ours") -> Figure:
        return Figure(
            name,
            median(samples[ours]),
            median(samples[side]),
            "ms",
            higher_is_better=False,
            target=target,
            note=note,
            samples={"ours": samples[ours], "baseline": samples[side]},
        )

    return [
        figure("parse_cpu_1000", "bs4 html.parser", 1.2, "baseline: BeautifulSoup, html.parser"),
        figure(
            "parse_cpu_1000_vs_lxml",
            "raw lxml",
            None,
            "baseline: raw lxml (parse + XPath), the floor; ratio < 1 is our gap to it",
        ),
        figure(
            "parse_cpu_1000_vs_bs4_lxml",
            "bs4 lxml",
            None,
            "baseline: BeautifulSoup on lxml, plain select() with uncompiled selectors",
        ),
        figure(
            "parse_cpu_1000_lxml",
            "bs4 html.parser",
            None,
            "ours with SOURCE_PARSER=lxml; baseline: BeautifulSoup, html.parser",
            ours="ours lxml",
        ),
        figure(
            "parse_cpu_1000_lxml_vs_lxml",
            "raw lxml",
            None,
            "ours with SOURCE_PARSER=lxml; baseline: raw lxml (parse + hand-written XPath)",
            ours="ours lxml",
        ),
    ]

"""Scenarios 10 (the parts no scriptable site can do) and 13: hostile bytes on the wire and
in the page. A gzip bomb and a connection reset mid-body reach a real worker process; random
and truncated HTML reach the parser."""

from __future__ import annotations

import random
from collections.abc import Callable

import psutil
from hypothesis import given, settings
from hypothesis import strategies as st

from core.settings import SourceProfile
from projects.v1 import task_pb2
from sample_site.pages import render_listing, sample_page
from tests.faults.ledger import Counts, Ledger, record
from tests.support.http_servers import RawExchange, gzip_of_zeros, raw_http_server
from tests.support.stack import Stack
from worker.parse import parse_listing

BOMB_BYTES = 200 * 1024 * 1024  # 200 MiB of zeros, about 200 kB on the wire
GOOD_PAGE = render_listing(sample_page(1)).encode()


def hostile(exchange: RawExchange) -> None:
    page = exchange.path.rsplit("=", 1)[-1]
    if page == "1":  # a decompression bomb
        body = gzip_of_zeros(BOMB_BYTES)
        exchange.send_head(
            headers={
                "Content-Type": "text/html",
                "Content-Encoding": "gzip",
                "Content-Length": str(len(body)),
            }
        )
        exchange.send(body)
    elif page == "2":  # promises a body, sends part of it, resets the connection
        exchange.send_head(headers={"Content-Type": "text/html", "Content-Length": "100000"})
        exchange.send(GOOD_PAGE[:500])
        exchange.reset()
    else:
        exchange.send_head(
            headers={"Content-Type": "text/html", "Content-Length": str(len(GOOD_PAGE))}
        )
        exchange.send(GOOD_PAGE)


def test_gzip_bomb_and_reset_mid_body(
    fault_stack: Callable[..., Stack], ledger_for: Callable[[Stack], Ledger]
) -> None:
    with raw_http_server(hostile) as server:
        stack = fault_stack(
            SOURCE_URL=f"{server.base_url}/projects?page={{page}}", RETRY_MAX_TRIES="3"
        )
        gateway = stack.start_gateway()
        worker = stack.start_worker(concurrency=2)
        memory = psutil.Process(worker.pid)
        before = memory.memory_info().rss
        ledger = ledger_for(stack)
        for page in (1, 2, 3):
            ledger.upload(gateway, page, f"hostile-{page}")
        ledger.settle(gateway, 90)
        grown_mib = (memory.memory_info().rss - before) / 2**20
        bomb, reset, good = (ledger.final[f"hostile-{page}"] for page in (1, 2, 3))
        tries = {page: server.requested().count(f"/projects?page={page}") for page in ("1", "2")}
        record(
            "10. hostile bytes",
            f"gzip bomb ({BOMB_BYTES // 2**20} MiB inflated) -> "
            f"{task_pb2.TaskStatus.Name(bomb.status)} in {tries['1']} try; reset mid-body -> "
            f"{task_pb2.TaskStatus.Name(reset.status)} in "
            f"{tries['2']} tries; worker RSS grew {grown_mib:.1f} MiB",
            ledger.count(set()),
        )
        assert bomb.status == task_pb2.TASK_STATUS_FAILURE and "larger than" in bomb.error
        assert reset.status == task_pb2.TASK_STATUS_FAILURE and "after 3 tries" in reset.error
        assert good.status == task_pb2.TASK_STATUS_SUCCESS
        assert tries == {"1": 1, "2": 3}
        assert grown_mib < 64, f"the bomb reached memory: the worker grew {grown_mib:.1f} MiB"


def test_parser_never_raises_on_random_or_truncated_html() -> None:
    profile = SourceProfile()
    page = render_listing(sample_page(2)).encode()
    counts = {"documents": 0, "items": 0, "skipped": 0}

    @settings(max_examples=400, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=4000),
            st.integers(min_value=0, max_value=len(page)).map(lambda n: page[:n]),
            st.integers(min_value=0, max_value=2**32).map(
                lambda seed: bytes(random.Random(seed).sample(list(page), k=len(page)))
            ),
        )
    )
    def parse(body: bytes) -> None:
        parsed = parse_listing(body, "http://127.0.0.1/projects?page=2", profile)
        listed = body.count(b'class="project')  # every item element the bytes still open
        assert len(parsed.items) + parsed.skipped <= listed
        counts["documents"] += 1
        counts["items"] += len(parsed.items)
        counts["skipped"] += parsed.skipped

    parse()
    whole = parse_listing(page, "http://127.0.0.1/projects?page=2", profile)
    assert (len(whole.items), whole.skipped) == (10, 0)
    record(
        "13. parser fuzz",
        f"{counts['documents']} random, truncated and shuffled documents: none raised; "
        f"{counts['items']} items parsed, {counts['skipped']} skipped",
        Counts(accepted=0, success=0, failure=0, lost=0, duplicated=0, rows=0),
    )

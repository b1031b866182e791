"""Scenarios 15 to 17: a dependency that hangs instead of dying, and one that is not there yet.

15. Redis SIGSTOPped for STALL_SECONDS mid-harvest: broker and result store on one server, then
    on two (the result store paused, then the broker).
16. The test's own PostgreSQL, every process SIGSTOPped for STALL_SECONDS mid-harvest.
17. Gateway and worker started before PostgreSQL, and before Redis; then the dependency starts.

While it hangs every RPC answers within its bound (PUBLISH_TIMEOUT_SECONDS), OK or UNAVAILABLE
with a RetryInfo, never DEADLINE_EXCEEDED; health goes NOT_SERVING within two check intervals
and back to SERVING once the dependency answers; afterwards the ledger counts 0 lost and 0
duplicated.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from projects.v1 import queue_service_pb2, task_pb2
from tests.conftest import StackFactory, own_redis_server
from tests.faults.conftest import FAST_FAILURE
from tests.faults.ledger import Ledger, record, sample_links
from tests.faults.stalls import (
    AUTH,
    NOT_SERVING,
    SERVING,
    HealthTimeline,
    RpcProbe,
    WatchThroughAStall,
)
from tests.support.processes import PostgresServer, RedisPause, RedisServer, free_port
from tests.support.stack import Stack, rpc_detail, upload, wait_for_task

STALL_SECONDS = 20.0
# The bound every call promises (PUBLISH_TIMEOUT_SECONDS, at its default), and what a loaded
# 2-core machine may add to it (a process's scheduling, the client's own time).
RPC_BOUND_SECONDS = 3.0
SLACK_SECONDS = 0.75
CHECK_INTERVAL_SECONDS = 0.5  # BROKER_CHECK_INTERVAL_SECONDS of tests/support/stack.py
HEALTH_BOUND_SECONDS = 2 * CHECK_INTERVAL_SECONDS
WATCH_POLL_SECONDS = 1.0  # how often the gateway's feed reads when no event wakes it
PAGES = list(range(1, 9))
# Enough tries that no task runs out of them while its dependency hangs: each try ends at the
# soft limit (or sooner) and is tried again.
PATIENT = {**FAST_FAILURE, "RETRY_MAX_TRIES": "30"}


@dataclass(frozen=True)
class Stall:
    detail: str  # each RPC's slowest answer against its bound, and its codes
    down: float  # seconds from the pause to health NOT_SERVING
    up: float  # seconds from the resume to health SERVING for good
    paused: float  # wall-clock time (time.time()) of the pause, to read logs against
    resumed: float


def harvest_through_a_stall(
    stack: Stack, ledger: Ledger, pause: Callable[[], None], resume: Callable[[], None]
) -> Stall:
    """Uploads before, during and after a stall of STALL_SECONDS, every RPC probed throughout.

    What each RPC answered, and how long health took to go NOT_SERVING and back.
    """
    gateway = stack.gateways[0]
    for page in PAGES[:4]:  # slow first answers: tries are fetching when the stall begins
        stack.site.script(page, [{"status": 503, "delay": 1.0}])
    # One page stored first, so that GetProject has a project to read.
    first = ledger.upload(gateway, PAGES[-1], f"before-{uuid.uuid4().hex[:8]}")
    wait_for_task(gateway, first.id)
    for page in PAGES[:-1]:
        ledger.upload(gateway, page, f"before-{uuid.uuid4().hex[:8]}")
    health = HealthTimeline(gateway.address).start()
    link = sorted(sample_links(stack.site.url, [PAGES[-1]]))[0]
    batch = gateway.stub.UploadPages(
        queue_service_pb2.UploadPagesRequest(first_page=PAGES[-1], last_page=PAGES[-1]),
        metadata=AUTH,
        timeout=10,
    ).batch
    probe = RpcProbe(gateway, ledger, PAGES, first.id, link, batch.id)
    probe.start()
    time.sleep(0.3)  # not for correctness: only so that each RPC is answered once before
    paused_at, paused_wall = time.monotonic(), time.time()
    pause()
    try:
        time.sleep(STALL_SECONDS)  # the stall itself: what is measured happens meanwhile
    finally:
        resumed_at, resumed_wall = time.monotonic(), time.time()
        resume()
    time.sleep(2 * HEALTH_BOUND_SECONDS)  # calls and health after it, probed too
    answers = probe.stop()
    health.stop()
    down = health.first(NOT_SERVING, paused_at)
    up = health.settled(SERVING, resumed_at)
    lines = [answer.line(name, RPC_BOUND_SECONDS) for name, answer in answers.items()]
    lines.append(f"health Check slowest {health.slowest:.2f} s")
    detail = "; ".join(lines)
    assert down is not None and down <= HEALTH_BOUND_SECONDS + SLACK_SECONDS, (down, detail)
    assert up is not None and up <= HEALTH_BOUND_SECONDS + SLACK_SECONDS, (up, health.changes)
    for name, answer in answers.items():
        assert not answer.improper, (name, answer.improper[:3])
        assert answer.slowest <= RPC_BOUND_SECONDS + SLACK_SECONDS, (name, detail)
        assert answer.codes.get("OK"), (name, "never answered OK", detail)
    return Stall(detail, down, up, paused_wall, resumed_wall)


@pytest.mark.parametrize(
    "layout",
    ["one server", "two servers, result store paused", "two servers, broker paused"],
)
def test_redis_paused_mid_harvest(
    make_stack: StackFactory,
    own_redis: RedisServer,
    ledger_for: Callable[[Stack], Ledger],
    tmp_path: Path,
    layout: str,
) -> None:
    with own_redis_server(tmp_path / "results") as results:
        if layout == "one server":
            stack = make_stack(broker_url=own_redis.url, **PATIENT)
            paused = RedisPause(own_redis)
        else:
            stack = make_stack(broker_url=own_redis.url, backend_url=results.url, **PATIENT)
            paused = RedisPause(results if "result store" in layout else own_redis)
        stack.start_gateway()
        stack.start_worker("worker-a", concurrency=2)
        stack.start_worker("worker-b", concurrency=2)
        ledger = ledger_for(stack)
        stall = harvest_through_a_stall(stack, ledger, paused.pause, paused.resume)
        ledger.settle(stack.gateways[0], 150)
        counts = ledger.count(sample_links(stack.site.url, PAGES))
        record(
            f"15. Redis SIGSTOPped {STALL_SECONDS:g} s mid-harvest ({layout})",
            f"health NOT_SERVING after {stall.down:.2f} s, SERVING {stall.up:.2f} s after "
            f"SIGCONT (bound {HEALTH_BOUND_SECONDS:g} s); {stall.detail}",
            counts,
        )
        assert counts.lost == 0 and counts.duplicated == 0
        assert counts.success == counts.accepted, [t.error for t in ledger.final.values()]


def test_postgres_paused_mid_harvest(
    make_stack: StackFactory,
    own_redis: RedisServer,
    own_postgres: PostgresServer,
    ledger_for: Callable[[Stack], Ledger],
) -> None:
    own_postgres.start()
    stack = make_stack(
        broker_url=own_redis.url,
        database_url=own_postgres.url,
        WATCH_POLL_INTERVAL_SECONDS=str(WATCH_POLL_SECONDS),
        **PATIENT,
    )
    gateway = stack.start_gateway()
    worker = stack.start_worker(concurrency=4)
    ledger = ledger_for(stack)
    watch = WatchThroughAStall(gateway.address).start()
    try:
        stall = harvest_through_a_stall(stack, ledger, own_postgres.pause, own_postgres.resume)
    finally:
        watch.stop()
    # The feed's next read (its timer, as no worker can store meanwhile) meets the stall and
    # ends the stream UNAVAILABLE, telling it to resume from its cursor: it does not go silent.
    assert watch.ended is not None and watch.ended_at is not None, "the watch stream stayed open"
    watch_ended = watch.ended_at - stall.paused
    code, details = watch.ended
    assert code == grpc.StatusCode.UNAVAILABLE and "resume from your last cursor" in details
    assert watch_ended <= WATCH_POLL_SECONDS + RPC_BOUND_SECONDS + SLACK_SECONDS, watch_ended
    ledger.settle(stack.gateways[0], 150)
    counts = ledger.count(sample_links(stack.site.url, PAGES))
    # The worker's tries ended while the database hung (at the soft limit, or sooner on a
    # bounded connect or statement) and were tried again: none held its thread for the stall.
    during = [
        (when, page, reason)
        for when, page, reason in retries(worker.output())
        if stall.paused <= when <= stall.resumed and "source answered" not in reason
    ]
    soft_limit = sum("TASK_SOFT_TIME_LIMIT_SECONDS" in reason for _, _, reason in during)
    pages = [page for _, page, _ in during]
    # Tries keep ending throughout the stall: from the pause to the first end, between two
    # ends, and from the last to the resume, no longer than a try and its countdown.
    moments = [stall.paused, *sorted(when for when, _, _ in during), stall.resumed]
    longest_try = max(later - earlier for earlier, later in itertools.pairwise(moments))
    try_bound = float(PATIENT["TASK_SOFT_TIME_LIMIT_SECONDS"]) + float(
        PATIENT["RETRY_MAX_DELAY_SECONDS"]
    )
    record(
        f"16. PostgreSQL SIGSTOPped {STALL_SECONDS:g} s mid-harvest",
        f"health NOT_SERVING after {stall.down:.2f} s, SERVING {stall.up:.2f} s after "
        f"SIGCONT (bound {HEALTH_BOUND_SECONDS:g} s); {len(during)} worker tries ended and "
        f"retried during the stall ({soft_limit} at the soft limit, the others on a bounded "
        f"database call), at most {max(map(pages.count, pages), default=0)} of one page, "
        f"one ending at least every {longest_try:.1f} s (a try and its countdown: "
        f"{try_bound:g} s); an open WatchProjects ended UNAVAILABLE {watch_ended:.2f} s into the "
        f"stall; {stall.detail}",
        counts,
    )
    # Tries end and are tried again while it hangs, more than once for a page, each within
    # its soft limit.
    assert any(pages.count(page) >= 2 for page in pages), worker.output()[-4000:]
    assert longest_try <= try_bound + SLACK_SECONDS, worker.output()[-4000:]
    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.success == counts.accepted, [t.error for t in ledger.final.values()]


_RETRY_LINE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[\w-]+\] "
    r"page (\d+), try \d+ failed \((.*)\); retrying in",
    re.MULTILINE,
)


def retries(output: str) -> list[tuple[float, int, str]]:
    """(wall-clock time, page, reason) of each try the worker's log says failed and is retried
    (Celery logs local time)."""
    return [
        (dt.datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(page), reason)
        for when, page, reason in _RETRY_LINE.findall(output)
    ]


def refused_while_starting(stack: Stack) -> float:
    """An Upload while a dependency is missing: UNAVAILABLE with RetryInfo; how long it took."""
    gateway = stack.gateways[0]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        gateway.stub.Upload(queue_service_pb2.UploadRequest(page=1), metadata=AUTH, timeout=30)
    took = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    rpc_detail(caught.value, error_details_pb2.RetryInfo)
    return took


@pytest.mark.parametrize("missing", ["postgres", "redis"])
def test_started_before_their_dependency(
    make_stack: StackFactory,
    own_postgres: PostgresServer,
    ledger_for: Callable[[Stack], Ledger],
    tmp_path: Path,
    missing: str,
) -> None:
    redis_server = RedisServer(tmp_path / "redis", free_port())
    if missing == "postgres":
        redis_server.start()
    else:
        own_postgres.start()
    try:
        stack = make_stack(
            broker_url=redis_server.url, database_url=own_postgres.url, **FAST_FAILURE
        )
        gateway = stack.start_gateway(ready=False)
        worker = stack.launch_worker(concurrency=2)
        health = HealthTimeline(gateway.address).start()
        refused = refused_while_starting(stack)
        # What each waits for, said once it has tried (it may take a while to get there).
        said = (
            ("waiting for the database", "waiting for the database")
            if missing == "postgres"
            else ("broker or result store unreachable", "Cannot connect to")
        )
        gateway.process.wait_for_line(said[0])
        worker.wait_for_line(said[1])
        # Several more tries meanwhile (every 0.5-2 s): each must not be told again, for a
        # minute. Not for correctness otherwise: the wait goes on a while.
        time.sleep(3)
        assert gateway.process.popen.poll() is None and worker.popen.poll() is None
        assert "ready." not in worker.output()  # it consumes nothing meanwhile
        assert health.statuses_since(0) == {NOT_SERVING}, health.changes
        assert gateway.process.output().count(said[0]) == 1
        assert worker.output().count(said[1]) == 1
        started_at = time.monotonic()
        if missing == "postgres":
            own_postgres.start()
        else:
            redis_server.start()
        worker.wait_for_line(r"ready\.", timeout=60)
        worker_up = time.monotonic() - started_at
        up = None
        deadline = time.monotonic() + 30
        while up is None and time.monotonic() < deadline:
            up = health.settled(SERVING, started_at)
            time.sleep(0.05)
        health.stop()
        assert up is not None, health.changes
        ledger = ledger_for(stack)
        for page in PAGES[:3]:
            ledger.upload(gateway, page, f"after-{uuid.uuid4().hex[:8]}")
        ledger.settle(gateway, 60)
        counts = ledger.count(sample_links(stack.site.url, PAGES[:3]))
        record(
            f"17. gateway and worker started before {missing}",
            f"Upload meanwhile UNAVAILABLE+RetryInfo in {refused:.2f} s, health NOT_SERVING "
            f"throughout; {missing} started: health SERVING after {up:.2f} s, worker consuming "
            f"after {worker_up:.2f} s",
            counts,
        )
        assert counts.lost == 0 and counts.duplicated == 0 and counts.success == 3
        assert upload(gateway, 4).status == task_pb2.TASK_STATUS_PENDING
    finally:
        redis_server.stop()

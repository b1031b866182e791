"""Scenarios 2 and 8: the broker stops, or dies with -9, with and without persistence."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2

from projects.v1 import task_pb2
from tests.conftest import StackFactory, own_redis_server
from tests.faults.conftest import FAST_FAILURE
from tests.faults.ledger import Ledger, record, sample_links
from tests.support.processes import RedisServer
from tests.support.stack import Stack, upload, wait_for_health


def test_broker_stopped_then_back(
    fault_stack: Callable[..., Stack], ledger_for: Callable[[Stack], Ledger], own_redis: RedisServer
) -> None:
    stack = fault_stack()
    gateway = stack.start_gateway()
    stack.start_worker(concurrency=2)
    ledger = ledger_for(stack)
    ledger.upload(gateway, 1, "before-1")
    own_redis.stop()
    refused = 0
    slowest = 0.0
    for attempt in range(5):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            upload(gateway, 2, request_id=f"down-{attempt}")
        slowest = max(slowest, time.monotonic() - started)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        refused += 1
    wait_for_health(gateway.address, health_pb2.HealthCheckResponse.NOT_SERVING, 10)
    own_redis.start()
    wait_for_health(gateway.address, health_pb2.HealthCheckResponse.SERVING, 30)
    for attempt in range(5):  # the same request_ids now enqueue for real
        ledger.upload(gateway, 2 + attempt, f"down-{attempt}")
    ledger.settle(gateway, 90)
    counts = ledger.count(sample_links(stack.site.url, [1, 2, 3, 4, 5, 6]))
    record(
        "2. broker stopped",
        f"{refused} Uploads while down: UNAVAILABLE in at most {slowest:.1f} s each, health "
        "NOT_SERVING; broker back, same request_ids retried",
        counts,
    )
    assert slowest < 8
    assert counts.lost == 0 and counts.duplicated == 0 and counts.success == 6


@pytest.mark.parametrize("appendonly", [True, False], ids=["appendonly", "no-persistence"])
def test_redis_killed_with_tasks_queued_and_running(
    make_stack: StackFactory,
    ledger_for: Callable[[Stack], Ledger],
    tmp_path_factory: pytest.TempPathFactory,
    appendonly: bool,
) -> None:
    with own_redis_server(tmp_path_factory.mktemp("redis"), appendonly=appendonly) as redis_server:
        stack = make_stack(
            broker_url=redis_server.url,
            RECONCILE_AFTER_SECONDS="3",
            RECONCILE_INTERVAL_SECONDS="1",
            **FAST_FAILURE,
        )
        gateway = stack.start_gateway()
        pages = list(range(1, 13))
        for page in pages:  # slow pages: some running, most still queued when Redis dies
            stack.site.script(page, [{"status": 503, "delay": 1.5}])
        stack.start_worker(concurrency=2)
        ledger = ledger_for(stack)
        for page in pages:
            ledger.upload(gateway, page, f"kill9-{uuid.uuid4().hex[:6]}-{page}")
        time.sleep(0.5)  # not for correctness: only so that some tasks are running
        redis_server.stop(signal.SIGKILL)
        redis_server.start()
        ledger.settle(gateway, 120)
        # Without persistence the lost tasks' pages are rightly absent: expect the links of
        # the tasks that succeeded, and a reason for every one that did not.
        succeeded = [
            ledger.pages[request_id]
            for request_id, task in ledger.final.items()
            if task.status == task_pb2.TASK_STATUS_SUCCESS
        ]
        counts = ledger.count(sample_links(stack.site.url, pages if appendonly else succeeded))
        lost_by_broker = sum(
            t.status == task_pb2.TASK_STATUS_FAILURE and "lost by the broker" in t.error
            for t in ledger.final.values()
        )
        record(
            f"8. Redis kill -9 ({'appendonly' if appendonly else 'no persistence'})",
            f"{len(pages)} slow pages queued/running, Redis SIGKILLed and restarted; "
            f"{lost_by_broker} reported FAILURE 'lost by the broker'",
            counts,
        )
        assert counts.lost == 0 and counts.duplicated == 0
        if appendonly:
            assert counts.success == len(pages)
        else:
            # Nothing ends in an endless PENDING: every task is SUCCESS or FAILURE saying why.
            assert counts.success + counts.failure == len(pages)

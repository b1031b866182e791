"""Scenarios 1 and 9: workers killed or shut down mid-work lose and duplicate nothing."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from celery.platforms import EX_FAILURE, EX_OK

from tests.faults.ledger import Ledger, record, sample_links
from tests.support.processes import poll_until
from tests.support.stack import Stack

PAGES = [1, 2, 3, 4, 5, 6]
SHUTDOWN_SECONDS = 60


def upload_pages(ledger: Ledger, stack: Stack, tag: str) -> None:
    gateway = stack.gateways[0]
    for page in PAGES:
        ledger.upload(gateway, page, f"{tag}-{page}")


def failpoint_reached(stack: Stack, point: str) -> Path:
    data = Path(stack.env["DATA_DIR"])
    found: Path = poll_until(
        lambda: next(iter(data.glob(f"failpoint-{point}-*")), None), 60, 0.05, f"failpoint {point}"
    )
    return found


@pytest.mark.parametrize("point", ["before_fetch", "after_store"])
def test_worker_killed_at_a_failpoint(
    fault_stack: Callable[..., Stack], ledger_for: Callable[[Stack], Ledger], point: str
) -> None:
    stack = fault_stack()
    gateway = stack.start_gateway()
    doomed = stack.start_worker("doomed", concurrency=2, FAILPOINTS=f"{point}=pause@3")
    ledger = ledger_for(stack)
    upload_pages(ledger, stack, point)
    failpoint_reached(stack, point)
    doomed.kill_group(signal.SIGKILL)
    stack.start_worker("rescuer", concurrency=2)
    ledger.settle(gateway, 90)
    counts = ledger.count(sample_links(stack.site.url, PAGES))
    record(
        f"1. worker SIGKILLed {point.replace('_', ' ')}",
        f"{len(PAGES)} pages, worker killed at the {point} failpoint of page 3, a new worker",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.success == len(PAGES)


def test_worker_killed_after_an_ack(
    fault_stack: Callable[..., Stack], ledger_for: Callable[[Stack], Ledger]
) -> None:
    stack = fault_stack()
    gateway = stack.start_gateway()
    stack.site.script(
        2, [{"status": 200, "headers": {"Content-Type": "text/html"}, "body": "", "delay": 30}]
    )
    doomed = stack.start_worker("doomed", concurrency=2)
    ledger = ledger_for(stack)
    upload_pages(ledger, stack, "after-ack")
    doomed.wait_for_line(r"succeeded in", timeout=60)  # a task done and acknowledged
    doomed.kill_group(signal.SIGKILL)
    stack.start_worker("rescuer", concurrency=2)
    ledger.settle(gateway, 90)
    counts = ledger.count(sample_links(stack.site.url, [p for p in PAGES if p != 2]))
    record(
        "1. worker SIGKILLed after an ack",
        f"{len(PAGES)} pages, worker killed once a task was acked while page 2 hung, a new worker",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.success + counts.failure == len(PAGES)


# Celery's exit codes: a warm shutdown (SIGTERM) ends with EX_OK, a cold one (SIGQUIT) with
# EX_FAILURE (celery.apps.worker's shutdown handlers).
@pytest.mark.parametrize(
    ("signum", "name", "exit_code"),
    [(signal.SIGTERM, "warm", EX_OK), (signal.SIGQUIT, "cold", EX_FAILURE)],
)
def test_worker_shutdown_with_tasks_queued(
    fault_stack: Callable[..., Stack],
    ledger_for: Callable[[Stack], Ledger],
    signum: int,
    name: str,
    exit_code: int,
) -> None:
    stack = fault_stack()
    gateway = stack.start_gateway()
    # Every page answers slowly, so the worker holds running and prefetched tasks when it stops.
    for page in PAGES:
        stack.site.script(page, [{"status": 503, "delay": 1.0}])
    worker = stack.start_worker("stopping", concurrency=2)
    ledger = ledger_for(stack)
    upload_pages(ledger, stack, name)
    worker.wait_for_line(r"Task projects.v1.harvest_page\[.*\] received", timeout=30)
    worker.send(signum)
    try:
        code = worker.popen.wait(SHUTDOWN_SECONDS)
    except subprocess.TimeoutExpired:
        # Celery's SIGUSR1 handler logs every thread's stack: where the shutdown is stuck.
        worker.send(signal.SIGUSR1)
        time.sleep(2)
        pytest.fail(
            f"the worker did not exit within {SHUTDOWN_SECONDS} s of {name} shutdown; its "
            f"threads:\n{worker.output()[-20000:]}"
        )
    assert code == exit_code, f"{name} shutdown exited with {code}:\n{worker.output()}"
    stack.start_worker("next", concurrency=2)
    ledger.settle(gateway, 120)
    counts = ledger.count(sample_links(stack.site.url, PAGES))
    record(
        f"9. worker {name} shutdown ({signal.Signals(signum).name})",
        f"{len(PAGES)} slow pages queued, worker stopped mid-work, a new worker",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.success == len(PAGES)

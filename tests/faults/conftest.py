"""Fault-suite fixtures: stacks tuned to fail fast (short visibility timeout and time limits)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import StackFactory
from tests.faults.ledger import REPORT, Ledger
from tests.support.processes import RedisServer
from tests.support.stack import Stack

# Redelivery within seconds: a killed worker's tasks come back after the visibility timeout.
FAST_FAILURE = {
    "BROKER_VISIBILITY_TIMEOUT_SECONDS": "8",
    "TASK_SOFT_TIME_LIMIT_SECONDS": "4",
    "TASK_TIME_LIMIT_SECONDS": "5",
    "FETCH_TIMEOUT_SECONDS": "3",
    "RETRY_AFTER_CAP_SECONDS": "1",
    "RETRY_MAX_DELAY_SECONDS": "1",
}


@pytest.fixture
def fault_stack(make_stack: StackFactory, own_redis: RedisServer) -> Callable[..., Stack]:
    """fault_stack(**env) -> a stack on the test's own Redis, tuned by FAST_FAILURE."""

    def make(**extra: str) -> Stack:
        return make_stack(broker_url=own_redis.url, **{**FAST_FAILURE, **extra})

    return make


@pytest.fixture
def ledger_for() -> Callable[[Stack], Ledger]:
    return Ledger


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("fault scenarios: what each did and counted")
        for line in REPORT:
            terminalreporter.write_line(line)

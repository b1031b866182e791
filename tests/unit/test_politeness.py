"""worker.politeness without Redis: the clock reading, the spacing, a turn's lateness check."""

from __future__ import annotations

import math
import time

import pytest
import redis.asyncio as aioredis

from worker.politeness import (
    CLOCK_READING_SECONDS,
    HEADERS_SENT_EVENT,
    LATE_SEND_SECONDS,
    SPACING_MARGIN,
    BudgetLimits,
    HostBudget,
    LateForTurn,
    RedisClock,
    Turn,
)


def test_redis_time_is_read_at_the_middle_of_the_tightest_round_trip() -> None:
    clock = RedisClock()
    assert clock.error == math.inf
    clock.observe(10.0, 10.010, 1000.005)  # Redis 990 s ahead, read within a 10 ms trip
    assert clock.error == pytest.approx(0.005)
    assert clock.local(1000.105) == pytest.approx(10.105)
    clock.observe(11.0, 11.002, 1001.003)  # a tighter trip wins
    assert clock.error == pytest.approx(0.001)
    assert clock.local(1001.003) == pytest.approx(11.002 - 0.001, abs=1e-6)
    clock.observe(12.0, 12.050, 1002.2)  # a looser one does not, while the reading is fresh
    assert clock.error == pytest.approx(0.001)
    later = 11.002 + CLOCK_READING_SECONDS + 1
    clock.observe(later, later + 0.004, 2000.0)  # an old reading gives way
    assert clock.error == pytest.approx(0.002)
    assert clock.local(2000.0) == pytest.approx(later + 0.002)


def test_the_spacing_is_the_rates_with_its_margin_or_the_crawl_delay() -> None:
    budget = HostBudget(aioredis.Redis(), "p:", BudgetLimits(10.0, 4, 30.0))
    assert budget.spacing() == pytest.approx((1 + SPACING_MARGIN) / 10.0)
    assert budget.spacing(crawl_delay=2.0) == 2.0
    assert budget.spacing(crawl_delay=0.01) == budget.spacing()


async def test_a_turn_that_cannot_move_holds_its_late_request_back() -> None:
    async def cannot_move() -> float | None:
        return None

    late = Turn(time.monotonic() - LATE_SEND_SECONDS - 0.005, 0.0, cannot_move)
    with pytest.raises(LateForTurn):
        await late.trace(HEADERS_SENT_EVENT, {})
    assert not late.moved


async def test_a_turn_that_moves_is_due_again_from_its_new_start() -> None:
    async def move() -> float | None:
        return time.monotonic()

    late = Turn(time.monotonic() - 1.0, 0.0, move)
    await late.trace(HEADERS_SENT_EVENT, {})
    assert late.moved and time.monotonic() - late.due < LATE_SEND_SECONDS

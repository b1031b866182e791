"""worker.politeness without Redis: the clock reading, the pace, a turn's lateness check."""

from __future__ import annotations

import math
import time

import pytest
import redis.asyncio as aioredis

from worker.politeness import (
    CLOCK_READING_SECONDS,
    CONNECT_STARTED_EVENT,
    HEADERS_OUT_EVENT,
    HEADERS_SENT_EVENT,
    LATE_SEND_SECONDS,
    RESERVE_AHEAD_SECONDS,
    WINDOW_MARGIN,
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


def pace(rate: float, crawl_delay: float | None = None) -> tuple[float, int, float]:
    budget = HostBudget(aioredis.Redis(), "p:", BudgetLimits(rate, 4, 30.0))
    got = budget.pace(crawl_delay)
    return round(got.window, 9), got.count, got.gap


def test_the_pace_is_the_rate_in_a_widened_second_and_the_crawl_delay_a_gap() -> None:
    second = round(1 + WINDOW_MARGIN, 9)
    assert pace(10.0) == (second, 10, 0.0)
    # Never more than the rate in any second: a fractional rate keeps its whole part.
    assert pace(2.5) == (second, 2, 0.0)
    # Below one a second, one start in each 1 / rate seconds.
    assert pace(0.5) == (round(2 * second, 9), 1, 0.0)
    assert pace(10.0, crawl_delay=2.0) == (second, 10, 2.0)


async def test_a_request_later_than_its_turn_allows_is_held_back_and_not_reported() -> None:
    reported: list[float] = []

    async def report(sent_at: float) -> None:
        reported.append(sent_at)

    late = Turn(time.monotonic() - LATE_SEND_SECONDS - 0.005, 0.0, report)
    with pytest.raises(LateForTurn, match="would have left"):
        await late.trace(HEADERS_SENT_EVENT, {})
    await late.reported()
    assert late.held_back and reported == []


async def test_a_turn_holds_its_request_to_its_allowance_and_says_its_setup() -> None:
    setups: list[float] = []
    allowance = LATE_SEND_SECONDS + 0.3  # a slow link's clock error and handshake
    due = time.monotonic() - LATE_SEND_SECONDS - 0.1
    turn = Turn(due, 0.0, allowance=allowance, on_setup=setups.append)
    await turn.trace(CONNECT_STARTED_EVENT, {})
    await turn.trace(HEADERS_SENT_EVENT, {})  # later than LATE_SEND_SECONDS, within its allowance
    assert not turn.held_back and turn.late > LATE_SEND_SECONDS
    assert len(setups) == 1 and setups[0] >= 0
    reused = Turn(time.monotonic() - allowance - 0.01, 0.0, allowance=allowance)
    with pytest.raises(LateForTurn, match="allowed 500 ms"):
        await reused.trace(HEADERS_SENT_EVENT, {})
    assert reused.held_back


def test_a_turn_allows_for_the_clock_error_and_the_handshake_up_to_the_lease() -> None:
    budget = HostBudget(aioredis.Redis(), "p:", BudgetLimits(5.0, 4, 11.0, request_seconds=9.0))
    budget._clock.observe(10.0, 10.4, 1000.2)  # a 400 ms round trip: 200 ms either way
    # Until a handshake is measured, a round trip to Redis stands in for it.
    assert budget._allowance("h") == pytest.approx(LATE_SEND_SECONDS + 0.4 + 0.4)
    budget._setup["h"] = 0.1
    assert budget._allowance("h") == pytest.approx(LATE_SEND_SECONDS + 0.1 + 0.4)
    budget._setup["h"] = 5.0
    # A request leaving later than this, then running for as long as a fetch may, would
    # outlive its slot's lease (taken at the grant, ahead of its start).
    assert budget._allowance("h") == pytest.approx(11.0 - RESERVE_AHEAD_SECONDS - 9.0)


async def test_a_request_is_reported_once_when_its_headers_are_out() -> None:
    reported: list[float] = []

    async def report(sent_at: float) -> None:
        reported.append(sent_at)

    due = time.monotonic() - 0.05  # late, but within what a turn allows: sent
    turn = Turn(due, 0.0, report)
    await turn.trace("connection.connect_tcp.started", {})
    await turn.trace(HEADERS_SENT_EVENT, {})
    started = time.monotonic()
    await turn.trace(HEADERS_OUT_EVENT, {})
    await turn.trace(HEADERS_SENT_EVENT, {})  # a redirect's next hop rides on the same turn
    await turn.trace(HEADERS_OUT_EVENT, {})
    await turn.reported()
    assert not turn.held_back and 0.05 <= turn.late < LATE_SEND_SECONDS
    assert len(reported) == 1 and reported[0] >= started

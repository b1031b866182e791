"""worker.politeness.HostBudget and worker.robots.RobotsCache on the machine's Redis.

Two budgets (or caches) on two Redis clients stand for two worker processes: what they share
is only what is in Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from tests.support.services import redis_namespace
from worker.errors import RetryableError
from worker.politeness import (
    HEADERS_SENT_EVENT,
    LATE_SEND_SECONDS,
    SPACING_MARGIN,
    BudgetLimits,
    HostBudget,
    LateForTurn,
    Turn,
    TurnNotGiven,
)
from worker.robots import RobotsAnswer, RobotsCache, RobotsDisallowed, RobotsUnreachable

pytestmark = pytest.mark.redis

HOST = "site.test:80"


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"test-polite-{uuid.uuid4().hex[:12]}:"
    with redis_namespace(prefix):
        yield prefix


@pytest.fixture
async def budgets(prefix: str) -> AsyncIterator[Callable[..., HostBudget]]:
    made: list[HostBudget] = []

    # A long lease by default: a machine that stalls for seconds must not free a slot by its
    # expiry in a test that is not about expiry.
    def make(rate: float = 1000.0, concurrency: int = 100, lease: float = 120.0) -> HostBudget:
        budget = HostBudget.from_url(
            "redis://127.0.0.1:6379/0", prefix, BudgetLimits(rate, concurrency, lease)
        )
        made.append(budget)
        return budget

    yield make
    for budget in made:
        await budget.close()


async def test_grants_are_spaced_by_the_rate_across_processes(
    budgets: Callable[..., HostBudget],
) -> None:
    rate = 20.0
    one, two = budgets(rate=rate), budgets(rate=rate)
    starts: list[float] = []  # each turn's start, as its process read Redis's clock
    woken: list[tuple[float, float]] = []

    async def take(budget: HostBudget) -> None:
        async with budget.turn(HOST) as turn:
            starts.append(turn.due)
            woken.append((turn.due, time.monotonic()))

    started = time.monotonic()
    await asyncio.gather(*(take(budget) for budget in [one, two] * 6))

    spacing = one.spacing()
    assert spacing == pytest.approx((1 + SPACING_MARGIN) / rate)
    gaps = [b - a for a, b in itertools.pairwise(sorted(starts))]
    assert len(starts) == 12
    # Both processes read Redis's clock to within their round trip (well under 5 ms here).
    assert min(gaps) >= spacing - 0.005, gaps
    assert all(due <= now for due, now in woken)  # no request may leave before its start
    # Used, not wasted: the twelfth start comes about eleven spacings after the first.
    assert max(starts) - started < 11 * spacing + 0.25


async def test_concurrency_is_capped_across_processes(
    budgets: Callable[..., HostBudget],
) -> None:
    one, two = budgets(concurrency=2), budgets(concurrency=2)
    holding = most = 0

    async def hold(budget: HostBudget) -> None:
        nonlocal holding, most
        async with budget.turn(HOST):
            holding += 1
            most = max(most, holding)
            await asyncio.sleep(0.1)
            holding -= 1

    started = time.monotonic()
    await asyncio.gather(*(hold(budget) for budget in [one, two] * 3))

    assert most == 2
    assert time.monotonic() - started >= 0.3  # six holds of 0.1 s, two at a time


async def test_a_slot_never_given_back_is_free_again_after_its_lease(
    budgets: Callable[..., HostBudget],
) -> None:
    dead, alive = budgets(concurrency=1, lease=0.5), budgets(concurrency=1, lease=0.5)
    # A process that took the slot and died: the script granted it, nobody releases it.
    granted, _, _, _ = await dead._ask(HOST, "lease-of-a-dead-worker", dead.spacing())
    assert granted
    started = time.monotonic()

    async with alive.turn(HOST) as turn:
        waited = time.monotonic() - started

    assert 0.4 <= waited <= 1.0
    assert turn.waited == pytest.approx(waited, abs=0.05)


async def test_a_pause_holds_every_process_off(budgets: Callable[..., HostBudget]) -> None:
    one, two = budgets(), budgets()
    await one.pause(HOST, 0.4)
    started = time.monotonic()

    async with two.turn(HOST):
        waited = time.monotonic() - started

    assert 0.35 <= waited <= 0.9
    await one.pause(HOST, 0.0)  # nothing: a pause never shortens
    async with two.turn(HOST):
        pass


async def test_a_turn_not_given_in_time_says_so(budgets: Callable[..., HostBudget]) -> None:
    budget = budgets(concurrency=1)
    async with budget.turn(HOST):
        with pytest.raises(TurnNotGiven, match=r"no turn on site\.test:80 within 0\.2 s"):
            async with budget.turn(HOST, max_wait=0.2):
                pass
    async with budget.turn(HOST, max_wait=10):  # given back: free again
        pass


async def test_crawl_delay_widens_the_spacing(budgets: Callable[..., HostBudget]) -> None:
    budget = budgets(rate=100.0)
    assert budget.spacing(crawl_delay=0.3) == 0.3
    assert budget.spacing(crawl_delay=0.001) == budget.spacing()
    async with budget.turn(HOST, crawl_delay=0.3):
        started = time.monotonic()
    async with budget.turn(HOST, crawl_delay=0.3):
        assert time.monotonic() - started >= 0.28


async def test_an_unreachable_redis_lets_no_request_out(prefix: str) -> None:
    budget = HostBudget.from_url("redis://127.0.0.1:9/0", prefix, BudgetLimits(5, 8, 30))
    try:
        with pytest.raises(RetryableError, match=r"budget for site\.test:80 in Redis"):
            async with budget.turn(HOST):
                pytest.fail("a turn without the budget")
    finally:
        await budget.close()


async def test_a_request_leaving_late_for_its_turn_is_stopped_before_it_is_sent() -> None:
    on_time = Turn(time.monotonic(), 0.0)
    await on_time.trace(HEADERS_SENT_EVENT, {})
    late = Turn(time.monotonic() - LATE_SEND_SECONDS - 0.01, 0.0)
    await late.trace("connection.connect_tcp.started", {})  # only the headers' send counts
    with pytest.raises(LateForTurn, match="would have left"):
        await late.trace(HEADERS_SENT_EVENT, {})
    # A redirect's next hop, after the first request left on time, is not stopped.
    await asyncio.sleep(LATE_SEND_SECONDS + 0.01)
    await on_time.trace(HEADERS_SENT_EVENT, {})


async def test_a_late_request_moves_its_turn_to_now_when_no_later_start_was_granted(
    budgets: Callable[..., HostBudget],
) -> None:
    rate = 10.0
    one, two = budgets(rate=rate), budgets(rate=rate)
    async with one.turn(HOST) as late:
        await asyncio.sleep(LATE_SEND_SECONDS + 0.02)  # a busy machine: it could not leave
        moved_at = time.monotonic()
        await late.trace(HEADERS_SENT_EVENT, {})  # moved to now: sent, not held back
        assert late.moved
    async with two.turn(HOST):
        # The next start is a spacing after the moved one, not after the original.
        assert time.monotonic() - moved_at >= one.spacing() - 0.005


async def test_a_late_request_is_held_back_when_a_later_start_was_granted(
    budgets: Callable[..., HostBudget],
) -> None:
    rate = 50.0  # a spacing of 21 ms: the other turn is granted while the first one is late
    one, two = budgets(rate=rate), budgets(rate=rate)
    async with one.turn(HOST) as late, two.turn(HOST) as next_one:
        await asyncio.sleep(LATE_SEND_SECONDS + 0.01)
        with pytest.raises(LateForTurn):
            await late.trace(HEADERS_SENT_EVENT, {})
        assert not late.moved and next_one.waited > 0


# --- robots.txt, shared ---------------------------------------------------------------------


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    yield client
    await client.aclose()


class CountingFetcher:
    def __init__(self, answer: RobotsAnswer, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.fetched: list[str] = []

    async def __call__(self, url: str) -> RobotsAnswer:
        self.fetched.append(url)
        await asyncio.sleep(self.delay)
        return self.answer


async def test_robots_txt_is_fetched_once_for_every_process(
    prefix: str, redis_client: aioredis.Redis
) -> None:
    fetcher = CountingFetcher(RobotsAnswer(200, "User-agent: *\nDisallow: /private\n"), 0.1)
    caches = [RobotsCache(redis_client, prefix, 60.0, fetcher) for _ in range(3)]

    rules = await asyncio.gather(*(cache.rules("http://site.test") for cache in caches * 4))

    assert fetcher.fetched == ["http://site.test/robots.txt"]
    for each in rules:
        each.check("http://site.test/public", "/public", "bot")
        with pytest.raises(RobotsDisallowed, match=r"robots\.txt disallows /private for bot"):
            each.check("http://site.test/private", "/private", "bot")


async def test_an_unreadable_robots_txt_is_kept_a_tenth_of_the_ttl(
    prefix: str, redis_client: aioredis.Redis
) -> None:
    fetcher = CountingFetcher(RobotsAnswer(503, reason="Service Unavailable"))
    cache = RobotsCache(redis_client, prefix, 3.0, fetcher)

    rules = await cache.rules("http://site.test")
    with pytest.raises(RobotsUnreachable, match="answered 503") as caught:
        rules.check("http://site.test/a", "/a", "bot")
    assert caught.value.retry_after is not None and 0.1 < caught.value.retry_after <= 0.3
    assert await redis_client.pttl(f"{prefix}harvester.robots:http://site.test") <= 300

    fetcher.answer = RobotsAnswer(404)
    await asyncio.sleep(0.35)
    (await cache.rules("http://site.test")).check("http://site.test/a", "/a", "bot")
    assert len(fetcher.fetched) == 2

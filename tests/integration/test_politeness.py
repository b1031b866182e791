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
    CONNECT_STARTED_EVENT,
    HEADERS_OUT_EVENT,
    HEADERS_SENT_EVENT,
    LATE_SEND_SECONDS,
    START_SPREAD,
    WINDOW_MARGIN,
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


async def send(turn: Turn) -> float:
    """What httpcore tells a turn about a request it sends; when its headers were out."""
    await turn.trace(HEADERS_SENT_EVENT, {})
    await turn.trace(HEADERS_OUT_EVENT, {})
    return time.monotonic()


def most_in_any_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    return max(
        sum(1 for later in starts[index:] if later < first + window)
        for index, first in enumerate(starts)
    )


async def test_at_most_the_rate_starts_in_any_window_across_processes(
    budgets: Callable[..., HostBudget],
) -> None:
    rate = 10.0
    one, two = budgets(rate=rate), budgets(rate=rate)
    starts: list[float] = []  # each turn's start, as its process read Redis's clock
    woken: list[tuple[float, float]] = []

    async def take(budget: HostBudget) -> None:
        async with budget.turn(HOST) as turn:
            starts.append(turn.due)
            woken.append((turn.due, time.monotonic()))
            await send(turn)

    started = time.monotonic()
    await asyncio.gather(*(take(budget) for budget in [*([one, two] * 12), one]))

    pace = one.pace()
    assert pace.window == pytest.approx(1 + WINDOW_MARGIN) and pace.count == 10
    assert len(starts) == 25
    # Both processes read Redis's clock to within their round trip (well under 5 ms here).
    assert most_in_any_window(starts, pace.window - 0.005) == 10, sorted(starts)
    assert all(due <= now for due, now in woken)  # no request may leave before its start
    # Paced within the window, not all at once.
    spread = START_SPREAD * pace.window / pace.count
    assert min(b - a for a, b in itertools.pairwise(sorted(starts))) >= spread - 0.005
    # Used, not wasted: a window's count over part of it, the next count a window later.
    assert sorted(starts)[9] - started < 9 * spread + 0.25
    assert max(starts) - started < 2 * pace.window + 0.25


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
    granted, _, _, _ = await dead._ask(
        HOST, "lease-of-a-dead-worker", dead.pace(), LATE_SEND_SECONDS
    )
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


async def test_crawl_delay_spaces_the_starts(budgets: Callable[..., HostBudget]) -> None:
    budget = budgets(rate=100.0)
    assert budget.pace(crawl_delay=0.3).gap == 0.3
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


async def test_a_late_request_holds_the_next_start_back_by_its_lateness_only(
    budgets: Callable[..., HostBudget],
) -> None:
    one, two = budgets(rate=1.0), budgets(rate=1.0)  # one request in any window
    window = one.pace().window
    async with one.turn(HOST) as late:
        await asyncio.sleep(0.06)  # a busy machine: it could not leave on time
        sent_at = await send(late)
        assert not late.held_back and late.late >= 0.06
    async with two.turn(HOST) as turn:
        waited = time.monotonic() - sent_at
        assert turn.due >= sent_at + window - 0.005  # a window after it left
    # Not after the latest it might have left: the log learnt when it did.
    assert waited < window + LATE_SEND_SECONDS / 2


async def test_a_request_too_late_for_its_turn_gives_its_place_back(
    budgets: Callable[..., HostBudget],
) -> None:
    one, two = budgets(rate=1.0), budgets(rate=1.0)  # one request in any window
    async with one.turn(HOST) as late:
        await asyncio.sleep(late.allowance + 0.01)
        with pytest.raises(LateForTurn):
            await send(late)
        assert late.held_back
    started = time.monotonic()
    async with two.turn(HOST):
        # The window's one place was free again (the start is only paced after the last one).
        assert time.monotonic() - started < one.pace().window - 0.2


async def test_a_place_is_freed_by_a_request_never_sent_and_kept_for_one_not_heard_of(
    budgets: Callable[..., HostBudget],
) -> None:
    one, two = budgets(rate=1.0), budgets(rate=1.0)  # one request in any window
    granted, _, _, _ = await one._ask(HOST, "never-sent", one.pace(), LATE_SEND_SECONDS)
    assert granted
    await one._release(HOST, "never-sent", unsent=True)
    started = time.monotonic()
    async with two.turn(HOST):
        # The window's one place was free again (the start is only paced after the last one).
        assert time.monotonic() - started < one.pace().window - 0.2
    # No word of when (or whether) that turn's request left: it counts as leaving as late as
    # it may have, so the next start is a window after that.
    started = time.monotonic()
    async with two.turn(HOST):
        waited = time.monotonic() - started
    assert waited >= one.pace().window + LATE_SEND_SECONDS - 0.05


async def connect_and_send(turn: Turn, setup: float) -> float:
    """What httpcore tells a turn about a request that first opens a connection taking `setup`
    seconds; when its headers were out."""
    await turn.trace(CONNECT_STARTED_EVENT, {})
    await asyncio.sleep(setup)
    return await send(turn)


async def test_a_request_whose_connection_takes_long_is_sent_and_counted_when_it_left(
    budgets: Callable[..., HostBudget],
) -> None:
    one, two = budgets(rate=1.0), budgets(rate=1.0)  # one request in any window
    window = one.pace().window
    setup = LATE_SEND_SECONDS + 0.1  # a handshake over a slow link
    # The first such handshake is longer than the turn allowed for: held back, and learnt.
    async with one.turn(HOST) as first:
        assert first.allowance < setup
        with pytest.raises(LateForTurn):
            await connect_and_send(first, setup)
    # The next turn allows for it: sent, though later than LATE_SEND_SECONDS after its start.
    async with one.turn(HOST) as turn:
        assert turn.allowance >= LATE_SEND_SECONDS + setup
        sent_at = await connect_and_send(turn, setup)
        assert not turn.held_back and turn.late > LATE_SEND_SECONDS
    # The log holds when it left: no other process starts within a window of it.
    async with two.turn(HOST) as after:
        assert after.due >= sent_at + window - 0.005
    # Late for another reason than what its way to the site costs: still held back.
    async with one.turn(HOST) as late:
        await asyncio.sleep(late.allowance + 0.01)
        with pytest.raises(LateForTurn):
            await send(late)


async def test_a_turn_held_to_its_allowance_is_held_back_by_the_log_that_long(
    budgets: Callable[..., HostBudget],
) -> None:
    one, two = budgets(rate=1.0), budgets(rate=1.0)
    allowance = LATE_SEND_SECONDS + 0.4
    granted, _, _, _ = await one._ask(HOST, "slow-link", one.pace(), allowance)
    assert granted
    # Never heard of: it may have left as late as its allowance, so the next start is a window
    # after that (the guarantee holds for a request sent that late).
    started = time.monotonic()
    async with two.turn(HOST):
        waited = time.monotonic() - started
    assert waited >= one.pace().window + allowance - 0.05


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

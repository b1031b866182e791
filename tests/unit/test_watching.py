"""gateway.watching without a database: a Subscription's bounded queue, and ProjectFeed fanning
the rows committed after its head out to every subscriber, once, in commit order.

The store is a fake (`head`, `changes_after` over an in-memory list) and the wake-ups a queue
the test feeds, so each wake-up is one the test made.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from gateway import watching
from gateway.errors import StoreUnavailable
from gateway.project_store import BEGINNING, Position, StoredProject
from gateway.watching import READ_BATCH, Delivery, Overflowed, ProjectFeed, Subscription

T0 = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
# Long enough that only the test's wake-ups make the feed read, short enough for a test.
NEVER = 3600.0
WAIT = 5.0


def row(revision: int, project_id: int, is_active: bool = True) -> StoredProject:
    return StoredProject(
        id=project_id,
        url=f"https://listing.test/projects/{project_id}",
        title=f"Project {project_id}",
        description="",
        is_active=is_active,
        start_date=None,
        first_seen_at=T0,
        updated_at=T0,
        last_seen_at=T0,
        revision=revision,
        start_sort=dt.date(1, 1, 1),
    )


def rows_of(deliveries: list[Delivery]) -> list[StoredProject]:
    return [row for delivery in deliveries for row in delivery.rows]


def ids(taken: list[Delivery] | list[StoredProject]) -> list[tuple[int, int]]:
    rows = [row for item in taken for row in (item.rows if isinstance(item, Delivery) else [item])]
    return [(r.revision, r.id) for r in rows]


# --- Subscription -----------------------------------------------------------------------------


async def test_take_returns_everything_offered_since_the_last_take_in_order() -> None:
    subscription = Subscription(capacity=10)

    assert subscription.offer(Delivery([row(1, 1), row(1, 2)]))
    assert subscription.offer(Delivery([row(2, 3)]))

    assert ids(await subscription.take()) == [(1, 1), (1, 2), (2, 3)]
    assert subscription.offer(Delivery([row(3, 4)]))
    assert ids(await subscription.take()) == [(3, 4)]


async def test_take_waits_until_something_is_offered() -> None:
    subscription = Subscription(capacity=10)
    taking = asyncio.ensure_future(subscription.take())
    await asyncio.sleep(0.01)
    assert not taking.done()

    subscription.offer(Delivery([row(1, 1)]))

    async with asyncio.timeout(WAIT):
        assert ids(await taking) == [(1, 1)]
    # And nothing is left for the next take.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await subscription.take()


async def test_an_offer_up_to_the_capacity_fits() -> None:
    subscription = Subscription(capacity=3)

    assert subscription.offer(Delivery([row(1, 1), row(1, 2)]))
    assert subscription.offer(Delivery([row(2, 3)]))

    assert not subscription.overflowed
    assert len(rows_of(await subscription.take())) == 3


async def test_an_offer_past_the_capacity_overflows_for_good() -> None:
    subscription = Subscription(capacity=3)
    assert subscription.offer(Delivery([row(1, 1), row(1, 2)]))

    assert not subscription.offer(Delivery([row(2, 3), row(2, 4)]))

    assert subscription.overflowed
    with pytest.raises(Overflowed):
        await subscription.take()
    # Nothing it held is kept, and nothing offered later is taken: it reads the database now.
    assert subscription._deliveries == []
    assert not subscription.offer(Delivery([row(3, 5)]))
    with pytest.raises(Overflowed):
        await subscription.take()


async def test_a_waiting_take_is_woken_by_the_overflow() -> None:
    subscription = Subscription(capacity=1)
    taking = asyncio.ensure_future(subscription.take())
    await asyncio.sleep(0)

    subscription.offer(Delivery([row(1, 1), row(1, 2)]))

    with pytest.raises(Overflowed):
        async with asyncio.timeout(WAIT):
            await taking


async def test_a_delivery_builds_each_filter_s_response_once_for_every_stream() -> None:
    delivery = Delivery([row(1, 1), row(1, 2, is_active=False), row(2, 3)])
    built: list[list[tuple[int, int]]] = []

    def build(rows: list[StoredProject]) -> list[tuple[int, int]]:
        built.append(ids(rows))
        return ids(rows)

    for _stream in range(3):
        assert delivery.response(None, build) == [(1, 1), (1, 2), (2, 3)]
        assert delivery.response(True, build) == [(1, 1), (2, 3)]
        assert delivery.response(False, build) == [(1, 2)]
    assert built == [[(1, 1), (1, 2), (2, 3)], [(1, 1), (2, 3)], [(1, 2)]]
    assert (delivery.first, delivery.last) == (Position(1, 1), Position(2, 3))


# --- ProjectFeed ------------------------------------------------------------------------------


class FakeStore:
    """head() and changes_after() over rows the test commits, in (revision, id) order."""

    def __init__(self, rows: list[StoredProject] | None = None) -> None:
        self.rows: list[StoredProject] = list(rows or [])
        self.reads: list[Position] = []
        self.failures = 0

    def commit(self, *rows: StoredProject) -> None:
        self.rows.extend(rows)

    async def head(self) -> Position:
        return max((r.position for r in self.rows), default=BEGINNING)

    async def changes_after(
        self, position: Position, is_active: bool | None, limit: int
    ) -> list[StoredProject]:
        self.reads.append(position)
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the fake database is down")
        after = sorted((r for r in self.rows if r.position > position), key=lambda r: r.position)
        return [r for r in after if is_active is None or r.is_active == is_active][:limit]


class Wakeups:
    """The events a worker would publish, sent by the test."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    def send(self) -> None:
        self._queue.put_nowait(object())

    async def __call__(self) -> AsyncIterator[object]:
        while True:
            yield await self._queue.get()


@contextlib.asynccontextmanager
async def running(feed: ProjectFeed) -> AsyncIterator[None]:
    await feed.prime()
    task = asyncio.create_task(feed.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_feed(
    store: FakeStore, wakeups: Wakeups, poll_interval: float = NEVER, buffer: int = 100
) -> ProjectFeed:
    return ProjectFeed(cast(Any, store), wakeups, poll_interval, buffer)


async def take(subscription: Subscription) -> list[StoredProject]:
    async with asyncio.timeout(WAIT):
        return rows_of(await subscription.take())


async def nothing_offered(subscription: Subscription) -> bool:
    try:
        async with asyncio.timeout(0.1):
            await subscription.take()
    except TimeoutError:
        return True
    return False


@contextlib.asynccontextmanager
async def subscribed(feed: ProjectFeed, count: int) -> AsyncIterator[list[Subscription]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(feed.subscribe()) for _ in range(count)]


async def test_a_wake_up_offers_the_new_rows_to_every_subscriber_once_in_order() -> None:
    store = FakeStore([row(1, 1), row(2, 2)])
    wakeups = Wakeups()
    feed = make_feed(store, wakeups)

    async with running(feed):
        async with subscribed(feed, 3) as subscriptions:
            assert feed.watchers == 3
            # Committed out of id order, one revision after the other.
            store.commit(row(3, 9), row(3, 4), row(4, 1))
            wakeups.send()

            for subscription in subscriptions:
                # Only what came after the head the feed was primed with, in (revision, id).
                assert ids(await take(subscription)) == [(3, 4), (3, 9), (4, 1)]

            store.commit(row(5, 2))
            wakeups.send()
            for subscription in subscriptions:
                assert ids(await take(subscription)) == [(5, 2)]

            # A wake-up with nothing new offers nothing, and nothing is offered twice.
            wakeups.send()
            for subscription in subscriptions:
                assert await nothing_offered(subscription)
        assert feed.watchers == 0


async def test_the_feed_starts_at_the_head_it_was_primed_with() -> None:
    store = FakeStore([row(7, 3)])
    wakeups = Wakeups()
    feed = make_feed(store, wakeups)

    async with running(feed), subscribed(feed, 1) as (subscription,):
        wakeups.send()
        assert await nothing_offered(subscription)
        assert store.reads[-1] == Position(7, 3)


async def test_a_feed_on_an_empty_database_offers_the_first_rows() -> None:
    store = FakeStore()
    wakeups = Wakeups()
    feed = make_feed(store, wakeups)

    async with running(feed), subscribed(feed, 1) as (subscription,):
        store.commit(row(1, 1))
        wakeups.send()
        assert ids(await take(subscription)) == [(1, 1)]
    assert store.reads[0] == BEGINNING


async def test_many_new_rows_are_read_in_batches_and_offered_in_order() -> None:
    store = FakeStore()
    wakeups = Wakeups()
    count = READ_BATCH * 2 + 7
    feed = make_feed(store, wakeups, buffer=count)

    async with running(feed), subscribed(feed, 1) as (subscription,):
        store.commit(*(row(1 + n // 100, n) for n in range(count)))
        wakeups.send()
        offered: list[StoredProject] = []
        while len(offered) < count:
            offered += await take(subscription)

    assert ids(offered) == sorted(ids(store.rows))
    assert len(store.reads) >= 3  # one wake-up, read READ_BATCH at a time


async def test_a_subscriber_that_overflows_is_dropped_and_the_others_go_on() -> None:
    store = FakeStore()
    wakeups = Wakeups()
    feed = make_feed(store, wakeups, buffer=3)

    async with running(feed), subscribed(feed, 2) as (slow, quick):
        store.commit(row(1, 1), row(1, 2))
        wakeups.send()
        assert ids(await take(quick)) == [(1, 1), (1, 2)]  # slow holds 2 of its 3

        store.commit(row(2, 3), row(2, 4))
        wakeups.send()
        assert ids(await take(quick)) == [(2, 3), (2, 4)]

        with pytest.raises(Overflowed):
            await take(slow)
        assert feed.watchers == 1

        store.commit(row(3, 5))
        wakeups.send()
        assert ids(await take(quick)) == [(3, 5)]
        assert slow._deliveries == []  # no longer offered anything
    assert feed.watchers == 0


async def test_the_poll_timer_reads_without_any_wake_up() -> None:
    store = FakeStore([row(1, 1)])
    feed = make_feed(store, Wakeups(), poll_interval=0.05)

    async with running(feed), subscribed(feed, 1) as (subscription,):
        store.commit(row(2, 2))
        assert ids(await take(subscription)) == [(2, 2)]
        store.commit(row(3, 3))
        assert ids(await take(subscription)) == [(3, 3)]


async def test_a_database_that_fails_ends_the_streams_and_is_read_again_after_a_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watching, "RETRY_SECONDS", 0.01)
    store = FakeStore()
    feed = make_feed(store, Wakeups(), poll_interval=0.05)

    async with running(feed):
        async with feed.subscribe() as failed:
            store.failures = 1
            # The stream ends UNAVAILABLE (it resumes from its cursor) instead of going silent.
            with pytest.raises(StoreUnavailable):
                await take(failed)
            assert feed.watchers == 0
        # Once the database answers, the feed reads on from its head: nothing is skipped.
        async with feed.subscribe() as later:
            store.commit(row(1, 1))
            assert ids(await take(later)) == [(1, 1)]
    assert store.failures == 0


async def until_stale(feed: ProjectFeed) -> None:
    """Until the feed has taken a wake-up that came while nobody was subscribed."""
    async with asyncio.timeout(WAIT):
        while not feed._stale:  # noqa: ASYNC110  # the feed has no event to tell it by
            await asyncio.sleep(0)


async def test_with_no_subscriber_a_wake_up_reads_nothing_and_the_next_one_takes_the_head() -> None:
    store = FakeStore([row(1, 1)])
    wakeups = Wakeups()
    feed = make_feed(store, wakeups)

    async with running(feed):
        for revision in (2, 3):
            store.commit(row(revision, revision))
            wakeups.send()
        await until_stale(feed)
        async with subscribed(feed, 1) as (first,):
            # The rows committed while nobody listened are the stream's to read itself (up to
            # the head taken as it subscribed); the feed offers only what came after.
            assert store.reads == []
            store.commit(row(4, 4))
            wakeups.send()
            assert ids(await take(first)) == [(4, 4)]
            assert store.reads == [Position(3, 3)]
        store.commit(row(5, 5))
        wakeups.send()
        await until_stale(feed)
        # Read while the feed had no subscriber: nothing, and the next stream starts after it.
        async with subscribed(feed, 1) as (second,):
            store.commit(row(6, 6))
            wakeups.send()
            assert ids(await take(second)) == [(6, 6)]
        assert store.reads == [Position(3, 3), Position(5, 5)]


async def test_a_stream_subscribing_during_a_read_is_offered_what_that_read_did_not_give_it() -> (
    None
):
    """The feed's read and a subscription taking the head again do not interleave: a row
    committed in between is either read by the stream (before its head) or offered to it."""
    store = FakeStore([row(1, 1)])
    wakeups = Wakeups()
    feed = make_feed(store, wakeups)
    gate = asyncio.Event()
    reading = asyncio.Event()
    changes_after = store.changes_after

    async def slow_changes_after(
        position: Position, is_active: bool | None, limit: int
    ) -> list[StoredProject]:
        reading.set()
        await gate.wait()
        return await changes_after(position, is_active, limit)

    async with running(feed), subscribed(feed, 1) as (early,):
        store.changes_after = slow_changes_after  # type: ignore[method-assign]
        store.commit(row(2, 2))
        wakeups.send()
        async with asyncio.timeout(WAIT):
            await reading.wait()
        subscribing = feed.subscribe()
        joining = asyncio.ensure_future(subscribing.__aenter__())
        await asyncio.sleep(0)  # it waits for the read to finish
        assert not joining.done()
        gate.set()
        late = await joining
        try:
            assert ids(await take(early)) == [(2, 2)]
            store.commit(row(3, 3))
            wakeups.send()
            assert ids(await take(late)) == [(3, 3)]
        finally:
            await subscribing.__aexit__(None, None, None)


async def test_run_before_prime_is_a_mistake() -> None:
    wakeups = Wakeups()
    feed = make_feed(FakeStore(), wakeups, poll_interval=0.01)

    with pytest.raises(RuntimeError, match="before prime"):
        async with asyncio.timeout(WAIT):
            await feed.run()

"""Fan the feed of project changes out to every WatchProjects stream of this gateway process.

One `ProjectFeed` per process reads the database once per wake-up (an event from a worker, see
`core.events`, or its slow timer when events are lost) for the rows committed after its head,
and offers them, as one `Delivery`, to every subscribed stream. A stream catches up from the
database at its own pace first, then takes what the feed offers; one that falls more than
WATCH_BUFFER_CHANGES behind is dropped from the feed and goes back to reading the database from
its own cursor, so a slow reader never grows the gateway's memory. So 1,000 idle watchers cost
one query and one response built per wake-up, not 1,000; and a process with no watcher reads
nothing at all: it takes the head again when the next stream subscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, TypeVar, cast

from core.events import Event, ProjectsChanged, TaskChanged
from gateway.errors import Unavailable
from gateway.project_store import Position, ProjectStore, StoredProject

log = logging.getLogger(__name__)

# Rows read in one query, by the feed and by a stream catching up.
READ_BATCH = 500
RETRY_SECONDS = 1.0
T = TypeVar("T")


class Overflowed(Exception):
    """The stream fell too far behind the feed: read on from the database."""


class Delivery:
    """The rows one read of the feed found, offered alike to every stream.

    Streams that were caught up when it came (nearly all of them) send the same response: it is
    built once per filter and kept here (`response`), so 1,000 streams cost one build.
    """

    __slots__ = ("_responses", "first", "last", "rows")

    def __init__(self, rows: list[StoredProject]) -> None:
        self.rows = rows
        self.first = rows[0].position
        self.last = rows[-1].position
        self._responses: dict[bool | None, object] = {}

    def rows_for(self, is_active: bool | None) -> list[StoredProject]:
        """The rows a stream with this `is_active` filter sends."""
        if is_active is None:
            return self.rows
        return [row for row in self.rows if row.is_active == is_active]

    def response(self, is_active: bool | None, build: Callable[[list[StoredProject]], T]) -> T:
        """`build` of the rows that pass `is_active`, made once per filter for every stream."""
        try:
            return cast(T, self._responses[is_active])
        except KeyError:
            built = self._responses[is_active] = build(self.rows_for(is_active))
            return built


class Subscription:
    """What the feed has offered one stream and the stream has not taken yet (bounded)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._deliveries: list[Delivery] = []
        self._rows = 0
        self._ready = asyncio.Event()
        self.overflowed = False
        self._failed: Unavailable | None = None

    def offer(self, delivery: Delivery) -> bool:
        """Queue `delivery`; False (and overflowed from now on) when it does not fit."""
        if self._rows + len(delivery.rows) > self._capacity:
            self.overflowed = True
            self._deliveries.clear()
        else:
            self._deliveries.append(delivery)
            self._rows += len(delivery.rows)
        self._ready.set()
        return not self.overflowed

    def fail(self, error: Unavailable) -> None:
        """The feed could not read the database: the stream ends with `error` at its next take."""
        self._failed = error
        self._deliveries.clear()
        self._ready.set()

    async def take(self) -> list[Delivery]:
        """Everything offered since the last take, once there is something; raises Overflowed,
        or the feed's Unavailable."""
        await self._ready.wait()
        if self._failed is not None:
            raise self._failed
        if self.overflowed:
            raise Overflowed
        deliveries, self._deliveries, self._rows = self._deliveries, [], 0
        self._ready.clear()
        return deliveries


class ProjectFeed:
    def __init__(
        self,
        store: ProjectStore,
        wakeups: Callable[[], AsyncIterator[object]],
        poll_interval: float,
        buffer: int,
    ) -> None:
        self._store = store
        self._wakeups = wakeups
        self._poll_interval = poll_interval
        self._buffer = buffer
        self._subscribers: set[Subscription] = set()
        self._wake = asyncio.Event()
        self._head: Position | None = None
        # Held while the head moves (a read, or taking it again), so that a stream subscribes
        # either before a read (and is offered it) or after its head (and reads it itself).
        self._reading = asyncio.Lock()
        # Changes came while nobody was subscribed, unread: the head is behind the database's.
        self._stale = False

    async def prime(self) -> None:
        """Take the database's head as the feed's, before any stream subscribes.

        From then on every row committed after it is offered to every subscriber; a stream
        that subscribes and then reads the database therefore misses nothing in between.
        """
        self._head = await self._store.head()

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        """A subscription offered every row committed after it began; the stream reads what was
        committed before from the database (rows commit in revision order: `worker.store`)."""
        subscription = Subscription(self._buffer)
        async with self._reading:
            if self._stale:
                # Cheaper than reading every change nobody was offered: what the new stream
                # needs up to the head it reads itself, as a stream does after prime().
                self._head = await self._store.head()
                self._stale = False
            self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    @property
    def watchers(self) -> int:
        return len(self._subscribers)

    async def _listen(self) -> None:
        async for _event in self._wakeups():
            self._wake.set()

    async def _read_new(self, head: Position) -> None:
        while True:
            rows = await self._store.changes_after(head, None, READ_BATCH)
            if not rows:
                return
            delivery = Delivery(rows)
            self._head = head = delivery.last
            for subscription in list(self._subscribers):
                if not subscription.offer(delivery):
                    self._subscribers.discard(subscription)
            if len(rows) < READ_BATCH:
                return

    async def run(self) -> None:
        """Read and offer new changes until cancelled."""
        if self._head is None:
            raise RuntimeError("ProjectFeed.run before prime")
        listener = asyncio.create_task(self._listen(), name="project-events")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await self._wake.wait()
                self._wake.clear()
                try:
                    async with self._reading:
                        if self._subscribers:
                            await self._read_new(self._head)
                        else:
                            self._stale = True
                except Unavailable as exc:
                    # A database that fails or stalls past its bound ends the streams, each
                    # told to resume from its cursor, rather than leaving them silent; the feed
                    # reads on from its head once the database answers.
                    log.warning("project feed: %s; its %d streams end", exc, len(self._subscribers))
                    for subscription in self._subscribers:
                        subscription.fail(exc)
                    self._subscribers.clear()
                    await asyncio.sleep(RETRY_SECONDS)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


class Watched:
    """What the hub told one WatchStatus or WatchBatch stream since the stream last looked."""

    __slots__ = ("_records", "woken")

    def __init__(self) -> None:
        self.woken = asyncio.Event()
        self._records: list[Mapping[str, Any]] = []

    def tell(self, record: Mapping[str, Any] | None) -> None:
        if record is not None:
            self._records.append(record)
        self.woken.set()

    def take(self) -> list[Mapping[str, Any]]:
        """The records the events carried since the last take, oldest first; unwakes."""
        self.woken.clear()
        records, self._records = self._records, []
        return records


class EventHub:
    """The one subscriber of a gateway process to the workers' events (`core.events`).

    It wakes the project feed on ProjectsChanged, and the WatchStatus and WatchBatch streams
    of a task or its batch on TaskChanged, handing a task's streams, and its batch's, the
    record the event carried. A woken stream sends that record when it is newer than what the
    stream has sent, else reads the records again; it also reads them on a slow timer, in case
    an event was lost.
    """

    def __init__(self, listen: Callable[[], AsyncIterator[Event]]) -> None:
        self._listen = listen
        self._projects = asyncio.Event()
        self._waiters: dict[str, set[Watched]] = {}

    async def project_wakeups(self) -> AsyncIterator[None]:
        """A wake-up each time projects changed (several at once may come as one)."""
        while True:
            await self._projects.wait()
            self._projects.clear()
            yield None

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[Watched]:
        """Told whenever the task or batch `key` may have changed."""
        watched = Watched()
        self._waiters.setdefault(key, set()).add(watched)
        try:
            yield watched
        finally:
            waiters = self._waiters[key]
            waiters.discard(watched)
            if not waiters:
                del self._waiters[key]

    def _wake(self, key: str | None, record: Mapping[str, Any] | None = None) -> None:
        for watched in self._waiters.get(key or "", ()):
            watched.tell(record)

    async def run(self) -> None:
        """Dispatch events until cancelled."""
        async for event in self._listen():
            if isinstance(event, ProjectsChanged):
                self._projects.set()
            elif isinstance(event, TaskChanged):
                self._wake(event.task_id, event.record)
                self._wake(event.batch_id, event.batch)

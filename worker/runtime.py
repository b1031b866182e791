"""The long-lived clients of one worker process: an event loop, an HTTP client, a DB engine.

Built when the worker process starts and closed when it shuts down (`worker.app`), and handed
to the task through its base class (`worker.task.HarvestTask`); nothing here is a global.

Celery runs tasks on a pool of threads; each hands its page's work (fetch, parse, store) to this
one loop, which runs in a thread of its own for the life of the process, and waits (its record's
writes go to a second loop, `TaskRecords`). So a process
keeps many pages in flight while each waits on the network, and the pooled engine and HTTP
connections always live on the loop that made them (an `asyncio.run` per task would make a new
loop each time and break them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from core.batching import Batcher
from core.db import create_engine
from core.events import EventPublisher, TaskChanged, record_json
from core.ledger import Finished, Outcome
from core.settings import Settings
from worker.errors import RetryableError
from worker.fetch import FetchLimits, make_client
from worker.politeness import NOTED_LATE_SECONDS, BudgetLimits, HostBudget
from worker.robots import RobotsCache
from worker.source import PoliteSource, SourcePolicy, robots_fetcher
from worker.store import TaskStart, finish_tasks, start_tasks

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a task waits for one of the process's database connections before that try fails.
POOL_WAIT_SECONDS = 5.0
STATEMENTS_PER_TRY = 4


def bounded_engine(settings: Settings, connections: int) -> AsyncEngine:
    """An engine of `connections` connections whose every call is bounded.

    Connects are bounded like the gateway's (DEPENDENCY_TIMEOUT_SECONDS); a statement by a
    share of the try's soft limit (a busy database may hold an upsert on row locks for
    seconds): a try makes up to STATEMENTS_PER_TRY calls in a row outside its harvest's own
    bound (its start, in the prerun and again, its retry's record), so a try whose database
    stops answering still ends within its soft limit, and is retried.
    """
    return create_engine(
        settings.resolved_database_url,
        pool_size=connections,
        max_overflow=0,
        pre_ping=False,
        pool_timeout=POOL_WAIT_SECONDS,
        connect_timeout=settings.dependency_timeout_seconds,
        statement_timeout=settings.task_soft_time_limit_seconds / STATEMENTS_PER_TRY,
    )


class LoopThread:
    """An event loop that runs in a thread of its own for the life of the process."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coroutine` on this loop and wait for it from the calling thread."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        """Cancel what still runs on the loop, then stop it.

        A task thread may still be waiting in `run` (a cold shutdown does not wait for the
        tasks): cancelled, its wait ends with CancelledError. Left pending on a stopped loop, it
        would wait forever, and the process, which joins its task threads on exit, with it.
        """
        with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(_cancel_the_others(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_the_others() -> None:
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


@dataclass(slots=True)
class _Start:
    task_id: str
    start: TaskStart | None = None


@dataclass(slots=True)
class _End:
    task_id: str
    outcome: Outcome
    finished: Finished | None = None


class TaskRecords(LoopThread):
    """The tasks' own records (start, retry, end) and their events, on a loop of their own.

    A page's parse runs on the work loop and holds it for the parse's length; many pages
    fetched together parse back to back. A task's state change queued behind them would reach
    its record, and its watchers, only after all of them. On this loop it waits for the GIL
    at most, and for WORKER_RECORD_CONNECTIONS connections that only these short writes use.

    Tasks start in bursts (a worker's slots fill at once) and end in bursts (their pages come
    back together): the starts that arrive together are written by one UPDATE, the ends by one
    transaction, and each group said by one pipeline of events (`start`, `end`).
    """

    def __init__(self, settings: Settings, events_url: str) -> None:
        super().__init__("task-records-loop")
        self.engine: AsyncEngine = bounded_engine(settings, settings.worker_record_connections)
        self.events: EventPublisher = self.run(_make_publisher(events_url, settings))
        self._starts = Batcher(self._write_starts, max_size=settings.worker_concurrency)
        self._ends = Batcher(self._write_ends, max_size=settings.worker_concurrency)
        self._window = settings.until_known_window

    async def start(self, task_id: str) -> TaskStart:
        """Count a start of `task_id` and mark it STARTED (`worker.store.start_tasks`), then say
        so; with the other starts that arrive meanwhile."""
        start = _Start(task_id)
        await self._starts.submit(start)
        assert start.start is not None
        return start.start

    async def _write_starts(self, starts: list[_Start]) -> None:
        # Two deliveries of one task in one burst are two starts: each is counted, in turn.
        waiting = starts
        while waiting:
            distinct: dict[str, _Start] = {}
            again: list[_Start] = []
            for start in waiting:
                if start.task_id in distinct:
                    again.append(start)
                else:
                    distinct[start.task_id] = start
            written = await start_tasks(self.engine, list(distinct))
            for task_id, start in distinct.items():
                start.start = written.get(task_id, TaskStart(0))
            waiting = again
        await self.events.publish_all([said(start.task_id, start.start) for start in starts])

    async def end(self, task_id: str, outcome: Outcome) -> Finished:
        """Give `task_id` its final state, counted once for its batch (`worker.store.finish_tasks`),
        then say so; with the other ends that arrive meanwhile."""
        end = _End(task_id, outcome)
        await self._ends.submit(end)
        assert end.finished is not None
        return end.finished

    async def _write_ends(self, ends: list[_End]) -> Sequence[BaseException | None] | None:
        try:
            finished = await finish_tasks(
                self.engine, [(end.task_id, end.outcome) for end in ends], self._window
            )
        except RetryableError:
            raise  # the database: each end is tried again by its task
        except Exception:
            if len(ends) == 1:
                raise
            # Something about one end (an error text the database refuses, say) fails only
            # that end: the others are written alone.
            errors: list[BaseException | None] = []
            for end in ends:
                try:
                    await self._write_ends([end])
                    errors.append(None)
                except Exception as exc:
                    errors.append(exc)
            return errors
        for end, done in zip(ends, finished, strict=True):
            end.finished = done
        await self.events.publish_all(
            [said_end(end.task_id, done) for end, done in zip(ends, finished, strict=True)]
        )
        return None

    def close(self) -> None:
        try:
            self.run(self.events.close(), timeout=5)
            self.run(self.engine.dispose(), timeout=5)
        finally:
            self.stop()


def said(task_id: str, start: TaskStart | None) -> TaskChanged:
    """The event of a start: the record as it left it, so a watcher need not read it. Only a
    batch's first start moves the batch's record, so only its event wakes the batch's
    watchers."""
    if start is None:
        return TaskChanged(task_id)
    batch_id = start.batch_id if start.batch_started else None
    record = None if start.record is None else record_json(start.record)
    return TaskChanged(task_id, batch_id, record)


def said_end(task_id: str, done: Finished) -> TaskChanged:
    """The event of an end: the records as it left them. Of a batch's ends written together,
    the last carries the batch's record, which all of them moved, and wakes its watchers."""
    record = None if done.record is None else record_json(done.record)
    if done.batch_record is None:
        return TaskChanged(task_id, None, record)
    return TaskChanged(task_id, done.batch_id, record, record_json(done.batch_record))


async def _make_publisher(url: str, settings: Settings) -> EventPublisher:
    return EventPublisher(url, settings.redis_key_prefix, settings.dependency_timeout_seconds)


class WorkerRuntime(LoopThread):
    """The work loop (fetch, parse, store) with its clients, and the tasks' `records`."""

    def __init__(self, settings: Settings, events_url: str) -> None:
        super().__init__("harvest-event-loop")
        self.settings = settings
        self.fetch_limits = FetchLimits(
            timeout=settings.fetch_timeout_seconds,
            max_bytes=settings.fetch_max_bytes,
            max_redirects=settings.fetch_max_redirects,
        )
        self.http: httpx.AsyncClient = self.run(self._make_client(settings.source_url))
        self.events: EventPublisher = self.run(_make_publisher(events_url, settings))
        # The fleet's budget for the source lives on the same Redis as the events.
        self.budget: HostBudget = self.run(self._make_budget(events_url))
        self.source = PoliteSource(
            self.http,
            self.fetch_limits,
            self.budget,
            self._robots_cache() if settings.source_obey_robots else None,
            SourcePolicy(settings.source_user_agent, settings.retry_after_cap_seconds),
        )
        # A task holds a connection only for a statement or two (its cancel check, then its
        # store), so a few serve many tasks in flight: a task waits its turn for one, briefly,
        # rather than each opening its own. Worker processes x (WORKER_DB_CONNECTIONS +
        # WORKER_RECORD_CONNECTIONS) is all the workers ask of the database's max_connections,
        # whatever their concurrency. The wait is bounded (POOL_WAIT_SECONDS, then
        # worker.store retries twice), so a database that holds every connection delays a
        # task by seconds, not by minutes.
        # No ping before each use: a connection that died idle fails its statement as a
        # transient error, which `worker.store` retries on a fresh one (SQLAlchemy drops the
        # pool's stale connections on such an error), and the ping was a round trip per
        # statement, two per page.
        self.engine: AsyncEngine = bounded_engine(settings, settings.worker_db_connections)
        self.records = TaskRecords(settings, events_url)

    async def _make_client(self, source_url: str) -> httpx.AsyncClient:
        return make_client(
            self.fetch_limits,
            source_url,
            self.settings.worker_concurrency,
            self.settings.source_user_agent,
        )

    async def _make_budget(self, url: str) -> HostBudget:
        settings = self.settings
        limits = BudgetLimits(
            requests_per_second=settings.source_max_requests_per_second,
            concurrency=settings.source_max_concurrency,
            lease_seconds=settings.source_lease_seconds,
            request_seconds=settings.fetch_timeout_seconds,
        )
        return HostBudget.from_url(
            url,
            settings.redis_key_prefix,
            limits,
            dependency_timeout=settings.dependency_timeout_seconds,
        )

    def _robots_cache(self) -> RobotsCache:
        return RobotsCache(
            self.budget.client,
            self.settings.redis_key_prefix,
            self.settings.robots_ttl_seconds,
            robots_fetcher(self.http, self.fetch_limits, self.budget),
        )

    def close(self) -> None:
        log.info(
            "requests to the source that could not leave on time for their turn: %d sent more "
            "than %.0f ms after their start, %d not sent",
            self.source.late_sends,
            NOTED_LATE_SECONDS * 1000,
            self.source.late_turns,
        )
        try:
            self.records.close()
            self.run(self.http.aclose(), timeout=5)
            self.run(self.events.close(), timeout=5)
            self.run(self.budget.close(), timeout=5)
            self.run(self.engine.dispose(), timeout=5)
        finally:
            self.stop()

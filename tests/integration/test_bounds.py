"""Every call to Redis and the database is bounded: against a Redis and a PostgreSQL of the
test's own that are SIGSTOPped (they hang without closing their sockets), and the machine's
PostgreSQL for statement_timeout. Each call ends within its bound as the gateway's
Unavailable (and tells health), and works again once the dependency answers."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from core.celery_config import make_celery
from core.db import create_engine, is_unreachable
from core.events import EventPublisher, TaskChanged, events_url
from core.migrate import migrate
from core.settings import Settings
from gateway.celery_queue import CeleryQueue, Publication, PublishingCelery
from gateway.errors import QueueUnavailable, StoreUnavailable
from gateway.records import TaskRecords
from tests.support.processes import PostgresServer, RedisPause, RedisServer

BOUND = 0.5  # DEPENDENCY_TIMEOUT_SECONDS in these tests
PUBLISH = 1.5
# What a loaded machine may add to a bound.
SLACK = 0.5
T = TypeVar("T")


async def timed(call: Callable[[], Awaitable[T]]) -> tuple[T | BaseException, float]:
    started = time.monotonic()
    try:
        result: T | BaseException = await call()
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


class Told:
    """An `on_unavailable` that counts how often it was told."""

    def __init__(self) -> None:
        self.times = 0

    async def __call__(self) -> None:
        self.times += 1


@pytest.mark.redis
async def test_a_paused_redis_is_unavailable_within_the_bound(own_redis: RedisServer) -> None:
    settings = Settings(celery_broker_url=own_redis.url, task_queue=f"q-{uuid.uuid4().hex[:8]}")
    told = Told()
    queue = CeleryQueue(
        make_celery(settings, "bounds-test", PublishingCelery), PUBLISH, BOUND, on_unavailable=told
    )
    task_id = str(uuid.uuid4())
    paused = RedisPause(own_redis)
    events = EventPublisher(events_url(own_redis.url, own_redis.url), "", BOUND)
    try:
        assert await queue.ping() is True
        assert (await queue.state(task_id)).status == "PENDING"
        paused.pause()
        try:
            state, took = await timed(lambda: queue.state(task_id))
            assert isinstance(state, QueueUnavailable), state
            # One read: a command's socket timeout, no retry on timeout (was 2 x 10 s).
            assert took <= 2 * BOUND + SLACK, took
            pinged, took = await timed(queue.ping)
            assert pinged is False and took <= 3 * BOUND + SLACK, took
            give_up = time.monotonic() + PUBLISH
            sent, took = await timed(
                lambda: queue.publish_many([Publication(str(uuid.uuid4()), 1, give_up)])
            )
            assert isinstance(sent, list) and isinstance(sent[0], QueueUnavailable), sent
            assert took <= PUBLISH + BOUND + SLACK, took
            assert told.times >= 2
            # A batch's events (CancelBatch): one bound for all of them, not one per event.
            many = [TaskChanged(str(uuid.uuid4())) for _ in range(100)]
            _, took = await timed(lambda: events.publish_all(many))
            assert took <= BOUND + SLACK, took
        finally:
            paused.resume()
        assert await queue.ping() is True
        assert (await queue.state(task_id)).status == "PENDING"
    finally:
        paused.resume()
        queue.close()
        await events.close()


@pytest.mark.postgres
async def test_a_statement_past_statement_timeout_is_unreachable(postgres_url: str) -> None:
    engine = create_engine(postgres_url, connect_timeout=BOUND, statement_timeout=BOUND)
    try:
        async with engine.connect() as conn:
            shown = (await conn.execute(text("SHOW statement_timeout"))).scalar()
            assert shown == "500ms"
            slept, took = await timed(lambda: conn.execute(text("SELECT pg_sleep(3)")))
        assert isinstance(slept, DBAPIError | TimeoutError), slept
        assert is_unreachable(slept)
        assert took <= BOUND + SLACK, took
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_a_paused_postgres_is_store_unavailable_within_the_bound(
    own_postgres: PostgresServer,
) -> None:
    own_postgres.start()
    await migrate(own_postgres.url)
    engine = create_engine(
        own_postgres.url, pool_timeout=BOUND, connect_timeout=BOUND, statement_timeout=BOUND
    )
    told = Told()
    records = TaskRecords(engine, dt.timedelta(hours=1), on_unavailable=told)
    task_id = str(uuid.uuid4())
    try:
        assert await records.get("alice", task_id) is None  # a pooled connection now
        own_postgres.pause()
        try:
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: records.get("alice", task_id),  # the pooled connection's pre-ping
                lambda: records.claim("alice", "r-1", 1),
                records.ping,
            ]
            for call in calls:
                result, took = await timed(call)
                assert isinstance(result, StoreUnavailable) or result is False, result
                # A pre-ping, then a reconnect: two steps of the bound at most.
                assert took <= 2 * BOUND + SLACK, took
            assert told.times >= 2
        finally:
            own_postgres.resume()
        assert await records.get("alice", task_id) is None
        assert await records.ping() is True
    finally:
        await engine.dispose()

"""gateway.issuing on real services: PostgreSQL records and a Redis broker of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.celery_config import make_celery
from core.db import create_engine
from core.migrate import upgrade_to_head
from core.settings import Settings
from gateway.celery_queue import CeleryQueue, PublishingCelery
from gateway.errors import QueueUnavailable, Unavailable
from gateway.issuing import Issuer
from gateway.records import IssuedTask, TaskRecords
from tests.support.processes import RedisPause, RedisServer
from worker.store import record_start

pytestmark = pytest.mark.postgres

QUEUE = "issuing-test"
PUBLISH_TIMEOUT = 1.0


@dataclass
class Issuing:
    issuer: Issuer
    records: TaskRecords
    queue: CeleryQueue
    broker: redis.Redis
    engine: AsyncEngine


@asynccontextmanager
async def issuing(database_url: str, broker: RedisServer) -> AsyncIterator[Issuing]:
    engine = create_engine(database_url)
    await upgrade_to_head(engine)
    settings = Settings(
        celery_broker_url=broker.url, celery_result_backend=broker.url, task_queue=QUEUE
    )
    queue = CeleryQueue(
        make_celery(settings, "issuing-test", PublishingCelery),
        publish_timeout=PUBLISH_TIMEOUT,
        dependency_timeout=PUBLISH_TIMEOUT / 2,
    )
    records = TaskRecords(engine, dt.timedelta(hours=1))
    client = redis.Redis.from_url(broker.url)
    try:
        yield Issuing(Issuer(records, queue), records, queue, client, engine)
    finally:
        client.close()
        queue.close()
        await engine.dispose()


def queued_ids(broker: redis.Redis) -> set[str]:
    """Ids of the tasks waiting in the broker's queue."""
    return {json.loads(message)["headers"]["id"] for message in broker.lrange(QUEUE, 0, -1)}


def give_up() -> float:
    return time.monotonic() + PUBLISH_TIMEOUT


async def test_tasks_issued_together_are_each_recorded_and_enqueued(
    postgres_url: str, own_redis: RedisServer
) -> None:
    tasks = [IssuedTask.new("alice", None, page) for page in range(1, 6)]

    async with issuing(postgres_url, own_redis) as it:
        await asyncio.gather(*(it.issuer.issue(task, give_up()) for task in tasks))
        for task in tasks:
            stored = await it.records.get("alice", task.id)
            assert stored is not None
            assert stored.page == task.page
        assert queued_ids(it.broker) == {task.id for task in tasks}


async def test_a_task_the_broker_did_not_take_is_unavailable_and_leaves_no_record(
    postgres_url: str, own_redis: RedisServer
) -> None:
    task = IssuedTask.new("alice", None, 1)

    async with issuing(postgres_url, own_redis) as it:
        own_redis.stop()
        with pytest.raises(QueueUnavailable):
            await it.issuer.issue(task, give_up())
        # Kept, the record would answer PENDING for a task that will never run.
        assert await it.records.get("alice", task.id) is None


async def test_a_caller_gone_before_its_group_is_cut_issues_nothing(
    postgres_url: str, own_redis: RedisServer
) -> None:
    kept, abandoned = IssuedTask.new("alice", None, 1), IssuedTask.new("alice", None, 2)

    async with issuing(postgres_url, own_redis) as it:
        waiting = asyncio.ensure_future(it.issuer.issue(kept, give_up()))
        leaving = asyncio.ensure_future(it.issuer.issue(abandoned, give_up()))
        await asyncio.sleep(0)  # both submitted; their group is not cut yet
        leaving.cancel()
        await waiting
        await it.issuer.drain()
        assert await it.records.get("alice", kept.id) is not None
        assert await it.records.get("alice", abandoned.id) is None
        assert queued_ids(it.broker) == {kept.id}
        assert leaving.cancelled()


class GatedClaims(TaskRecords):
    """Records whose claims, once written, wait for `gate` before they return."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, dt.timedelta(hours=1))
        self.claimed = asyncio.Event()
        self.gate = asyncio.Event()

    async def claim(self, client: str, request_id: str, page: int) -> tuple[IssuedTask, bool]:
        claimed = await super().claim(client, request_id, page)
        self.claimed.set()
        await self.gate.wait()
        return claimed


async def test_a_caller_gone_once_its_request_id_is_claimed_still_has_it_published(
    postgres_url: str, own_redis: RedisServer
) -> None:
    async with issuing(postgres_url, own_redis) as it:
        records = GatedClaims(it.engine)
        issuer = Issuer(records, it.queue)
        caller = asyncio.ensure_future(issuer.claim("alice", "request-1", 1, give_up))
        await records.claimed.wait()  # the record is written; the caller goes
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        records.gate.set()
        await issuer.drain()
        ids = queued_ids(it.broker)
        assert len(ids) == 1
        stored = await it.records.get("alice", ids.pop())
        # Left claimed and unpublished, a repeat of request-1 would wait for it, then send it.
        assert stored is not None and stored.request_id == "request-1"
        assert stored.published_at is not None


async def test_a_claim_of_a_request_id_held_already_issues_nothing_again(
    postgres_url: str, own_redis: RedisServer
) -> None:
    async with issuing(postgres_url, own_redis) as it:
        first, created = await it.issuer.claim("alice", "request-1", 1, give_up)
        again, created_again = await it.issuer.claim("alice", "request-1", 1, give_up)
        assert (created, created_again) == (True, False)
        assert again.id == first.id
        assert queued_ids(it.broker) == {first.id}


async def test_a_failed_publish_drops_its_record_unless_a_worker_started_it(
    postgres_url: str, own_redis: RedisServer
) -> None:
    # A worker runs no task without a record (tests/unit/test_task.py), so a message that
    # reaches the broker after its publish was reported failed never runs; one a worker
    # started first did reach the broker, and keeps its record.
    unstarted, started = IssuedTask.new("alice", None, 1), IssuedTask.new("alice", None, 2)

    async with issuing(postgres_url, own_redis) as it:
        await it.records.add_many([unstarted, started])
        assert await record_start(it.engine, started.id) == 1

        gone = IssuedTask.new("alice", None, 3)  # never recorded, or dropped by another call
        kept = await it.records.forget_many([unstarted.id, started.id, gone.id])

        assert kept == {started.id}
        assert await record_start(it.engine, unstarted.id) == 0
        assert await it.records.get("alice", started.id) is not None


async def test_a_task_a_worker_started_while_its_publish_timed_out_counts_as_issued(
    postgres_url: str, own_redis: RedisServer
) -> None:
    paused = RedisPause(own_redis)

    async with issuing(postgres_url, own_redis) as it:
        task, created = await it.records.claim("alice", "request-1", 1)
        assert created
        paused.pause()
        try:
            issuing_it = asyncio.ensure_future(it.issuer.issue(task, give_up(), claimed=True))
            assert await record_start(it.engine, task.id) == 1  # a worker got it meanwhile
            # Its caller may hear UNAVAILABLE ("it may still run") if the verdict is late.
            with contextlib.suppress(Unavailable):
                await issuing_it
            await it.issuer.drain()
        finally:
            paused.resume()
        stored = await it.records.get("alice", task.id)
        # Kept and marked published: a repeat of its request_id gets it, and it is not sent again.
        assert stored is not None and stored.started_at is not None
        assert stored.published_at is not None


async def test_a_re_issue_that_fails_keeps_its_record(
    postgres_url: str, own_redis: RedisServer
) -> None:
    # Its first publish may have gone out and been answered OK: the task may be queued.
    async with issuing(postgres_url, own_redis) as it:
        task, _ = await it.records.claim("alice", "request-1", 1)
        own_redis.stop()
        with pytest.raises(QueueUnavailable):
            await it.issuer.issue(task, give_up(), claimed=True, droppable=False)
        assert await it.records.get("alice", task.id) is not None

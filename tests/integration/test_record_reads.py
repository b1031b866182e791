"""The gateway's task and batch records read together, on a real database (SQLite and
PostgreSQL): the reads asked for at once are one SELECT, and each caller still gets only its
own live record. And the record a worker's event carries is the one the gateway would read.

What one event wakes (many WatchStatus streams, each reading its task) must cost one query, not
one per stream; and the shared read must not hand a client another client's record.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import TaskRecord, create_engine
from core.events import TaskChanged, _decode, _encode, record_json
from core.ledger import Outcome, finish, finish_many
from core.migrate import upgrade_to_head
from gateway.batches import BatchRecords, StoredBatch
from gateway.records import IssuedTask, TaskRecords
from worker.store import record_retry, start_tasks

LIFETIME = dt.timedelta(hours=1)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url, pool_size=4)
    try:
        await upgrade_to_head(made)
        yield made
    finally:
        await made.dispose()


class Selects:
    """The SELECTs the engine runs on `table` from now on."""

    def __init__(self, engine: AsyncEngine, table: str) -> None:
        self.statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip().upper().startswith("SELECT") and table in statement:
                self.statements.append(statement)

        event.listen(engine.sync_engine, "before_cursor_execute", seen)


async def test_reads_asked_for_together_are_one_select_each_answering_its_own_caller(
    engine: AsyncEngine,
) -> None:
    records = TaskRecords(engine, LIFETIME)
    alice = [IssuedTask.new("alice", None, page) for page in range(1, 31)]
    bob = [IssuedTask.new("bob", None, page) for page in range(1, 11)]
    await records.add_many(alice + bob)
    async with engine.begin() as conn:  # one of alice's tasks has started
        await conn.execute(
            update(TaskRecord).where(TaskRecord.id == alice[0].id).values(status="STARTED")
        )
    selects = Selects(engine, "FROM tasks")
    unknown = str(uuid.uuid4())
    asked = (
        [("alice", task.id) for task in alice]
        + [("bob", task.id) for task in bob]
        + [("alice", bob[0].id), ("bob", unknown), ("alice", alice[0].id)]
    )
    found = await asyncio.gather(*(records.get(client, task_id) for client, task_id in asked))
    assert len(selects.statements) == 1, selects.statements
    by_id = {task.id: task for task in alice + bob}
    for (client, task_id), task in zip(asked[:40], found[:40], strict=True):
        assert task is not None and (task.id, task.client) == (task_id, client)
        assert task.page == by_id[task_id].page
    assert found[0] is not None and found[0].status == "STARTED"
    assert found[40] is None  # bob's task, asked for by alice
    assert found[41] is None  # never issued
    assert found[42] == found[0]  # one task asked for twice: both callers answered

    # A lone read later is a query of its own, which sees what was committed since.
    async with engine.begin() as conn:
        await conn.execute(
            update(TaskRecord).where(TaskRecord.id == bob[1].id).values(status="STARTED")
        )
    again = await records.get("bob", bob[1].id)
    assert again is not None and again.status == "STARTED"
    assert len(selects.statements) == 2


async def test_expired_records_read_together_are_none(engine: AsyncEngine) -> None:
    writer = TaskRecords(engine, LIFETIME)
    old = IssuedTask.new("alice", None, 1)
    old = IssuedTask(old.id, "alice", None, 1, old.enqueued_at - 2 * LIFETIME, old.published_at)
    fresh = IssuedTask.new("alice", None, 2)
    await writer.add_many([old, fresh])
    found = await asyncio.gather(writer.get("alice", old.id), writer.get("alice", fresh.id))
    assert found[0] is None
    assert found[1] is not None and found[1].id == fresh.id


async def test_batches_asked_for_together_are_one_select(engine: AsyncEngine) -> None:
    batches = BatchRecords(engine, LIFETIME)
    made = [
        (await batches.create(client, None, 1, 3, until_known=False, window=4)).batch
        for client in ("alice", "alice", "bob")
    ]
    selects = Selects(engine, "FROM batches")
    asked = [("alice", made[0].id), ("alice", made[1].id), ("bob", made[2].id)] * 5 + [
        ("alice", made[2].id)
    ]
    found = await asyncio.gather(*(batches.get(client, batch_id) for client, batch_id in asked))
    assert len(selects.statements) == 1, selects.statements
    for (client, batch_id), batch in zip(asked[:-1], found[:-1], strict=True):
        assert batch is not None and (batch.id, batch.client) == (batch_id, client)
        assert batch.pages_total == 3
    assert found[-1] is None  # bob's batch, asked for by alice


async def test_the_record_a_worker_s_event_carries_is_the_one_the_gateway_reads(
    engine: AsyncEngine,
) -> None:
    records = TaskRecords(engine, LIFETIME)
    task = IssuedTask.new("alice", None, 7)
    await records.add_many([task])

    def through_the_event(record: dict[str, Any] | None) -> IssuedTask | None:
        assert record is not None
        sent = _encode(TaskChanged(task.id, None, record_json(record)))
        event = _decode(sent)
        assert isinstance(event, TaskChanged) and event.record is not None
        return IssuedTask.from_record(event.record)

    start = (await start_tasks(engine, [task.id]))[task.id]
    started = await records.get("alice", task.id)
    assert started is not None and started.status == "STARTED" and started.deliveries == 1
    assert through_the_event(start.record) == started

    retried = await record_retry(engine, task.id, "503 from the source")
    assert through_the_event(retried) == await records.get("alice", task.id)

    again = (await start_tasks(engine, [task.id]))[task.id]
    assert through_the_event(again.record) == await records.get("alice", task.id)

    async with engine.begin() as conn:
        finished = await finish(conn, task.id, Outcome("SUCCESS", 3, 2, 1, 0), window=0)
    ended = await records.get("alice", task.id)
    assert ended is not None and ended.finished_at is not None
    assert through_the_event(finished.record) == ended
    # Each write moved the record forward, as a stream orders what events carry.
    steps = [through_the_event(r) for r in (start.record, retried, again.record, finished.record)]
    progress = [step.progress for step in steps if step is not None]
    assert progress == sorted(progress) and len(set(progress)) == 4


async def test_the_batch_record_an_end_event_carries_is_the_one_the_gateway_reads(
    engine: AsyncEngine,
) -> None:
    batches = BatchRecords(engine, LIFETIME)
    claimed = await batches.create("alice", None, 1, 3, until_known=False, window=4)
    batch_id = claimed.batch.id
    pages = [task.id for task in claimed.pages]

    def through_the_event(record: dict[str, Any] | None) -> StoredBatch | None:
        assert record is not None
        event = _decode(_encode(TaskChanged(pages[0], batch_id, None, record_json(record))))
        assert isinstance(event, TaskChanged) and event.batch is not None
        return StoredBatch.from_record(event.batch)

    # Only the starts that wrote the batch's start time moved its record (their events wake
    # the batch's watchers); a later page's start leaves it as it was.
    first = await start_tasks(engine, pages[:2])
    assert [first[page].batch_started for page in pages[:2]] == [True, True]
    later = await start_tasks(engine, pages[2:])
    assert later[pages[2]].batch_started is False

    async with engine.begin() as conn:
        group = await finish_many(
            conn,
            [(pages[1], Outcome("FAILURE", error="boom")), (pages[0], Outcome("SUCCESS", 3, 2, 1))],
            window=4,
        )
    # The batch's record goes with the last of its pages ended together (page 2, listed first).
    assert group[1].batch_record is None and group[0].batch_record is not None
    counted = await batches.get("alice", batch_id)
    assert counted is not None and counted.pages_failed == 1 and counted.finished_at is None
    assert through_the_event(group[0].batch_record) == counted

    async with engine.begin() as conn:
        (last,) = await finish_many(conn, [(pages[2], Outcome("SUCCESS", 1, 1, 0))], window=4)
    ended = await batches.get("alice", batch_id)
    assert ended is not None and ended.finished_at is not None and ended.status == "FAILURE"
    assert through_the_event(last.batch_record) == ended
    # Each count moved the record forward, as WatchBatch orders what events carry.
    assert claimed.batch.progress < counted.progress < ended.progress


class Inserts:
    """The INSERT statements the engine runs on `table` from now on (executemany counts once)."""

    def __init__(self, engine: AsyncEngine, table: str) -> None:
        self.statements = 0

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip().upper().startswith(f"INSERT INTO {table.upper()} "):
                self.statements += 1

        event.listen(engine.sync_engine, "before_cursor_execute", seen)


async def test_claims_made_together_are_one_insert_and_each_request_id_one_record(
    engine: AsyncEngine,
) -> None:
    records = TaskRecords(engine, LIFETIME)
    held, _ = await records.claim("alice", "held", 7)
    inserts = Inserts(engine, "tasks")
    asked = [("alice", f"r{n}", n) for n in range(1, 41)]
    asked += [("bob", "r1", 1), ("alice", "held", 7), ("alice", "r1", 1)]

    claimed = await asyncio.gather(*(records.claim(*one) for one in asked))

    assert 1 <= inserts.statements <= 2  # one, or two if the claims were cut in two batches
    by_request: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for (client, request_id, page), (task, created) in zip(asked, claimed, strict=True):
        assert (task.client, task.request_id, task.page) == (client, request_id, page)
        by_request.setdefault((client, request_id), []).append((task.id, created))
    # Each request_id has one task; only one of its claims created it.
    for key, answers in by_request.items():
        assert len({task_id for task_id, _ in answers}) == 1, key
        assert sum(created for _, created in answers) == (0 if key == ("alice", "held") else 1)
    assert by_request[("alice", "held")][0][0] == held.id
    assert by_request[("alice", "r1")][0][0] != by_request[("bob", "r1")][0][0]
    for (client, _), answers in by_request.items():
        assert await records.get(client, answers[0][0]) is not None


async def test_a_claim_of_an_expired_request_id_makes_a_new_task(engine: AsyncEngine) -> None:
    old, _ = await TaskRecords(engine, LIFETIME).claim("alice", "again", 3)
    async with engine.begin() as conn:
        await conn.execute(
            update(TaskRecord)
            .where(TaskRecord.id == old.id)
            .values(enqueued_at=old.enqueued_at - 2 * LIFETIME)
        )

    new, created = await TaskRecords(engine, LIFETIME).claim("alice", "again", 3)

    assert created and new.id != old.id

"""worker.runtime: a process's database connections come from WORKER_DB_CONNECTIONS."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert

from core.db import TaskRecord, utcnow
from core.ledger import Finished, Outcome
from core.migrate import upgrade_to_head
from core.settings import Settings
from worker import runtime as runtime_module
from worker.errors import RetryableError
from worker.runtime import LoopThread, TaskRecords, WorkerRuntime, said, said_end
from worker.store import TaskStart, record_start


def test_tasks_share_worker_db_connections_and_wait_a_bounded_time_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wait = 0.3
    monkeypatch.setattr(runtime_module, "POOL_WAIT_SECONDS", wait)  # 5 s in production
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'projects.db'}",
        source_url="http://127.0.0.1:9/projects?page={page}",
        worker_concurrency=16,
        worker_db_connections=2,
    )
    # No event is published here: nothing connects to this Redis.
    runtime = WorkerRuntime(settings, "redis://127.0.0.1:9/0")
    try:
        runtime.run(upgrade_to_head(runtime.engine))

        # Sixteen task starts at once, as sixteen task threads would make them: two connections.
        async def sixteen_starts() -> list[int]:
            return list(
                await asyncio.gather(
                    *(record_start(runtime.engine, str(uuid.uuid4())) for _ in range(16))
                )
            )

        starts = runtime.run(sixteen_starts())
        assert starts == [0] * 16
        pool = runtime.engine.pool
        assert pool.checkedin() == 2  # type: ignore[attr-defined]

        async def with_every_connection_held() -> float:
            async with runtime.engine.connect(), runtime.engine.connect():
                started = time.monotonic()
                with pytest.raises(RetryableError):
                    await record_start(runtime.engine, str(uuid.uuid4()))
                return time.monotonic() - started

        waited = runtime.run(with_every_connection_held())
        # Three tries of POOL_WAIT_SECONDS each, then the task is retried by Celery.
        assert 3 * wait <= waited < 3 * wait + 2
    finally:
        runtime.close()


def test_starts_that_arrive_together_are_one_update_and_a_task_started_twice_counts_twice(
    records: TaskRecords,
) -> None:
    ids = _issued(records, 15)
    updates: list[str] = []

    def count_updates(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE TASKS"):
            updates.append(statement)

    event.listen(records.engine.sync_engine, "before_cursor_execute", count_updates)

    async def burst() -> list[TaskStart]:
        # Sixteen starts at once, as sixteen task threads make them; one task twice, as a
        # redelivery that lands in the same burst would.
        return list(await asyncio.gather(*(records.start(i) for i in [*ids, ids[0]])))

    starts = records.run(burst())

    assert [start.deliveries for start in starts] == [1, *[1] * 14, 2]
    # The fifteen distinct ones in one statement, the second start of ids[0] after it.
    assert len(updates) == 2


def test_ends_that_arrive_together_are_one_transaction_and_a_task_ended_twice_counts_once(
    records: TaskRecords,
) -> None:
    ids = _issued(records, 15)
    transactions: list[object] = []
    event.listen(records.engine.sync_engine, "begin", transactions.append)

    async def burst() -> list[Finished]:
        # Sixteen ends at once, as sixteen task threads make them; one task twice, as a
        # copy that outlived its visibility timeout would.
        ends = [*ids, ids[0]]
        return list(
            await asyncio.gather(
                *(records.end(i, Outcome("SUCCESS", found=n)) for n, i in enumerate(ends))
            )
        )

    ended = records.run(burst())

    assert [finished.counted for finished in ended] == [True] * 15 + [False]
    assert [(finished.record or {}).get("found") for finished in ended[:15]] == list(range(15))
    # All sixteen were submitted in one loop turn: one group, one transaction.
    assert len(transactions) == 1


def test_an_end_the_database_cannot_write_fails_alone_not_its_group(
    records: TaskRecords,
) -> None:
    ids = _issued(records, 4)
    outcomes = [Outcome("SUCCESS"), Outcome("RETRY"), Outcome("FAILURE", error="x")]
    outcomes.append(Outcome("SUCCESS"))

    async def burst() -> list[Any]:
        ends = (records.end(i, o) for i, o in zip(ids, outcomes, strict=True))
        return list(await asyncio.gather(*ends, return_exceptions=True))

    ended = records.run(burst())

    assert isinstance(ended[1], ValueError)  # not a final state: that end alone fails
    assert [e.counted for e in (ended[0], ended[2], ended[3])] == [True, True, True]


@pytest.fixture
def records(tmp_path: Path) -> Iterator[TaskRecords]:
    """A worker process's records on a migrated SQLite file; its events go nowhere."""
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'projects.db'}",
        source_url="http://127.0.0.1:9/projects?page={page}",
        worker_concurrency=16,
    )
    runtime = WorkerRuntime(settings, "redis://127.0.0.1:9/0")
    try:
        runtime.records.run(upgrade_to_head(runtime.records.engine))
        yield runtime.records
    finally:
        runtime.close()


def _issued(records: TaskRecords, count: int) -> list[str]:
    """The ids of `count` tasks recorded as the gateway records them."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    records.run(_issue(records.engine, ids))
    return ids


async def _issue(engine: Any, ids: list[str]) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(TaskRecord),
            [
                {"id": task_id, "client": "test", "page": 1, "enqueued_at": utcnow()}
                for task_id in ids
            ],
        )


def test_stopping_a_loop_ends_the_waits_of_threads_whose_work_still_runs_on_it() -> None:
    # As at a cold shutdown: a task thread waits in run() for work the loop never finishes.
    loop_thread = LoopThread("test-loop")
    waited: list[BaseException] = []

    def task_thread() -> None:
        try:
            loop_thread.run(asyncio.sleep(3600))
        except BaseException as exc:
            waited.append(exc)

    thread = threading.Thread(target=task_thread, daemon=True)
    thread.start()
    poll = time.monotonic() + 5
    while len(asyncio.all_tasks(loop_thread.loop)) == 0 and time.monotonic() < poll:
        time.sleep(0.01)

    loop_thread.stop()
    thread.join(timeout=5)

    assert not thread.is_alive(), "the waiting thread was left waiting on a stopped loop"
    assert [type(exc) for exc in waited] == [concurrent.futures.CancelledError]
    assert loop_thread.loop.is_closed()


def test_only_what_moved_a_batch_s_record_wakes_its_watchers() -> None:
    batch = {"id": "b", "pages_succeeded": 1}
    first = said("t1", TaskStart(1, batch_id="b", record={"id": "t1"}, batch_started=True))
    later = said("t2", TaskStart(1, batch_id="b", record={"id": "t2"}))
    assert (first.batch_id, later.batch_id) == ("b", None)  # a later start moves no batch
    assert later.record == {"id": "t2"}

    counted = said_end("t1", Finished(True, "b", [], {"id": "t1"}, batch))
    in_its_group = said_end("t2", Finished(True, "b", [], {"id": "t2"}))
    alone = said_end("t3", Finished(True, None, [], {"id": "t3"}))
    assert (counted.batch_id, counted.batch) == ("b", batch)
    assert (in_its_group.batch_id, in_its_group.batch) == (None, None)
    assert (alone.batch_id, alone.record) == (None, {"id": "t3"})

"""gateway.reconciler's two-pass rule, with records and a queue faked in memory.

A never-started task that is neither queued nor known to the result backend is only a suspect
after one pass; missing in two passes in a row, it is marked lost, saying why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from typing import cast

import pytest

from core.db import utcnow
from gateway.celery_queue import CeleryQueue, CeleryState
from gateway.errors import StoreContended, StoreUnavailable
from gateway.reconciler import LOST_BY_BROKER, NEVER_PUBLISHED, Reconciler
from gateway.records import IssuedTask, TaskRecords

QUEUE = "harvest"
AFTER = dt.timedelta(minutes=5)
ENQUEUED = dt.datetime(2026, 3, 1, 11, 30, 15, tzinfo=dt.UTC)


def task(n: int, *, published: bool = True) -> IssuedTask:
    return IssuedTask(
        id=f"00000000-0000-4000-8000-{n:012d}",
        client="alice",
        request_id=None,
        page=n,
        enqueued_at=ENQUEUED,
        published_at=ENQUEUED if published else None,
    )


class FakeRecords:
    """The records' side of a pass: the candidates it is given, the reasons it is told."""

    def __init__(self, *tasks: IssuedTask) -> None:
        self.unstarted = list(tasks)
        self.cutoffs: list[dt.datetime] = []
        self.marked: list[dict[str, str]] = []
        self.failures: list[Exception] = []  # raised by the next passes, one each
        self.mark_failures: list[Exception] = []  # raised by the next marks, one each
        self.marks_tried = 0
        self.some_marked = asyncio.Event()

    async def unstarted_before(self, cutoff: dt.datetime) -> list[IssuedTask]:
        self.cutoffs.append(cutoff)
        if self.failures:
            raise self.failures.pop(0)
        return [t for t in self.unstarted if t.lost_reason is None]

    async def mark_lost(self, reasons: dict[str, str]) -> None:
        self.marks_tried += 1
        if self.mark_failures:
            raise self.mark_failures.pop(0)
        self.marked.append(dict(reasons))
        self.some_marked.set()
        self.unstarted = [
            dataclasses.replace(t, lost_reason=reasons[t.id]) if t.id in reasons else t
            for t in self.unstarted
        ]


class FakeQueue:
    """The broker's and the backend's side: what is queued, and each task's state."""

    def __init__(self) -> None:
        self.queued: set[str] | None = set()
        self.states: dict[str, str] = {}
        self.asked: list[str] = []

    async def queued_ids(self, queue: str) -> set[str] | None:
        assert queue == QUEUE
        return None if self.queued is None else set(self.queued)

    async def state(self, task_id: str) -> CeleryState:
        self.asked.append(task_id)
        return CeleryState(self.states.get(task_id, "PENDING"), None, None)


def reconciler(records: FakeRecords, queue: FakeQueue, interval: float = 60.0) -> Reconciler:
    return Reconciler(cast(TaskRecords, records), cast(CeleryQueue, queue), QUEUE, AFTER, interval)


async def test_a_task_missing_in_one_pass_is_only_a_suspect() -> None:
    records, queue = FakeRecords(task(1)), FakeQueue()

    assert await reconciler(records, queue).run_once() == set()

    assert records.marked == []


async def test_a_published_task_missing_in_two_passes_in_a_row_was_lost_by_the_broker() -> None:
    lost = task(1)
    records, queue = FakeRecords(lost), FakeQueue()
    judge = reconciler(records, queue)

    assert await judge.run_once() == set()
    assert await judge.run_once() == {lost.id}

    reason = LOST_BY_BROKER.format(enqueued=ENQUEUED)
    assert records.marked == [{lost.id: reason}]
    assert "enqueued at 2026-03-01 11:30:15 UTC" in reason
    assert "lost by the broker" in reason


async def test_a_task_never_confirmed_published_never_reached_the_broker() -> None:
    unconfirmed = task(1, published=False)
    records, queue = FakeRecords(unconfirmed), FakeQueue()
    judge = reconciler(records, queue)

    await judge.run_once()
    assert await judge.run_once() == {unconfirmed.id}

    reason = NEVER_PUBLISHED.format(enqueued=ENQUEUED)
    assert records.marked == [{unconfirmed.id: reason}]
    assert reason.startswith("never reached the broker")


async def test_each_lost_task_gets_its_own_reason_in_one_mark() -> None:
    published, unconfirmed = task(1), task(2, published=False)
    records, queue = FakeRecords(published, unconfirmed), FakeQueue()
    judge = reconciler(records, queue)

    await judge.run_once()
    assert await judge.run_once() == {published.id, unconfirmed.id}

    assert records.marked == [
        {
            published.id: LOST_BY_BROKER.format(enqueued=ENQUEUED),
            unconfirmed.id: NEVER_PUBLISHED.format(enqueued=ENQUEUED),
        }
    ]


async def test_a_lost_task_is_judged_once() -> None:
    records, queue = FakeRecords(task(1)), FakeQueue()
    judge = reconciler(records, queue)

    for _ in range(5):
        await judge.run_once()

    assert len(records.marked) == 1


async def test_a_task_that_reappears_in_the_queue_is_cleared() -> None:
    # Between two lists (say, moved from the queue to a worker's unacked set): not lost.
    moving = task(1)
    records, queue = FakeRecords(moving), FakeQueue()
    judge = reconciler(records, queue)

    assert await judge.run_once() == set()  # a suspect
    queue.queued = {moving.id}
    assert await judge.run_once() == set()  # seen: cleared
    queue.queued = set()
    assert await judge.run_once() == set()  # a suspect again, not a second strike

    assert records.marked == []
    assert await judge.run_once() == {moving.id}  # two passes in a row at last


@pytest.mark.parametrize("status", ["RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE"])
async def test_a_task_the_result_backend_knows_is_not_lost(status: str) -> None:
    # Not queued, yet a worker has it (its start not recorded yet) or already finished it.
    known = task(1)
    records, queue = FakeRecords(known), FakeQueue()
    queue.states[known.id] = status
    judge = reconciler(records, queue)

    assert await judge.run_once() == set()
    assert await judge.run_once() == set()

    assert records.marked == []


async def test_a_queued_task_is_not_asked_about() -> None:
    waiting = task(1)
    records, queue = FakeRecords(waiting), FakeQueue()
    queue.queued = {waiting.id}
    judge = reconciler(records, queue)

    await judge.run_once()
    await judge.run_once()

    assert queue.asked == []
    assert records.marked == []


async def test_only_the_missing_of_several_candidates_are_lost() -> None:
    waiting, running, lost = task(1), task(2), task(3)
    records, queue = FakeRecords(waiting, running, lost), FakeQueue()
    queue.queued = {waiting.id}
    queue.states[running.id] = "STARTED"
    judge = reconciler(records, queue)

    await judge.run_once()
    assert await judge.run_once() == {lost.id}

    assert [set(marked) for marked in records.marked] == [{lost.id}]


async def test_queued_ids_none_means_no_judgement() -> None:
    # AMQP queues cannot be read without taking from them: nobody is judged.
    records, queue = FakeRecords(task(1), task(2, published=False)), FakeQueue()
    queue.queued = None
    judge = reconciler(records, queue)

    for _ in range(4):
        assert await judge.run_once() == set()

    assert records.marked == []
    assert queue.asked == []


async def test_no_candidates_clears_the_suspects() -> None:
    suspect = task(1)
    records, queue = FakeRecords(suspect), FakeQueue()
    judge = reconciler(records, queue)

    await judge.run_once()  # a suspect
    records.unstarted = []  # started meanwhile, say
    assert await judge.run_once() == set()
    records.unstarted = [suspect]
    assert await judge.run_once() == set()  # one pass again, not two

    assert records.marked == []


async def test_candidates_are_the_tasks_enqueued_longer_ago_than_reconcile_after() -> None:
    records, queue = FakeRecords(), FakeQueue()

    before = utcnow()
    await reconciler(records, queue).run_once()
    after = utcnow()

    (cutoff,) = records.cutoffs
    assert before - AFTER <= cutoff <= after - AFTER


async def test_run_forever_passes_on_an_unavailable_store_and_keeps_going() -> None:
    lost = task(1)
    records, queue = FakeRecords(lost), FakeQueue()
    records.failures = [StoreUnavailable("connection refused")] * 2
    judge = asyncio.ensure_future(reconciler(records, queue, interval=0).run_forever())
    try:
        async with asyncio.timeout(10):
            await records.some_marked.wait()
    finally:
        judge.cancel()
        with pytest.raises(asyncio.CancelledError):
            await judge

    # Two failed passes, then the two that judged the task.
    assert len(records.cutoffs) >= 4
    assert records.marked == [{lost.id: LOST_BY_BROKER.format(enqueued=ENQUEUED)}]


async def test_run_forever_logs_a_failed_pass_and_keeps_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug in one pass is logged; reconciling goes on for the life of the process.
    lost = task(1)
    records, queue = FakeRecords(lost), FakeQueue()
    records.failures = [RuntimeError("a bug")]
    judge = asyncio.ensure_future(reconciler(records, queue, interval=0).run_forever())
    try:
        async with asyncio.timeout(10):
            await records.some_marked.wait()
    finally:
        judge.cancel()
        with pytest.raises(asyncio.CancelledError):
            await judge

    assert "reconciler pass failed" in caplog.text
    assert "a bug" in caplog.text
    assert records.marked == [{lost.id: LOST_BY_BROKER.format(enqueued=ENQUEUED)}]


async def test_a_mark_the_database_gives_up_for_a_concurrent_change_runs_again() -> None:
    # A worker's end locking the same batch row: a deadlock, one side given up.
    lost = task(1)
    records, queue = FakeRecords(lost), FakeQueue()
    records.mark_failures = [StoreContended("deadlock detected")]
    judge = reconciler(records, queue)

    await judge.run_once()
    assert await judge.run_once() == {lost.id}

    assert records.marks_tried == 2
    assert records.marked == [{lost.id: LOST_BY_BROKER.format(enqueued=ENQUEUED)}]


async def test_tasks_a_failed_mark_left_unmarked_are_marked_by_the_next_pass() -> None:
    lost = task(1)
    records, queue = FakeRecords(lost), FakeQueue()
    records.mark_failures = [StoreUnavailable("connection refused")]
    judge = reconciler(records, queue)

    await judge.run_once()
    with pytest.raises(StoreUnavailable):
        await judge.run_once()
    assert records.marked == []
    # Still suspects after two passes: the next pass marks them, it does not start over.
    assert await judge.run_once() == {lost.id}
    assert records.marked == [{lost.id: LOST_BY_BROKER.format(enqueued=ENQUEUED)}]

"""A task's final state, written once, and its batch's counts moved in the same transaction.

Gateway and worker both end tasks: a worker when a page succeeds, fails for good or is found
cancelled; the gateway when it cancels a task that has not started, or the reconciler finds
one the broker lost. Each goes through `finish` (or `revoke_unstarted`, its form for many
queued pages of one cancelled batch), whose UPDATE only takes a task that has no final state
yet: the first to finish a task counts it for its batch, in the same transaction, and every
later try (a redelivery after a crash, a copy that outlived the visibility timeout)
changes nothing. So a batch's counts are exact, and reading them is one row.

An "until known" batch enqueues its next pages here too, as its pages finish: a page is added
only while it is fewer than UNTIL_KNOWN_WINDOW pages past the lowest page not yet finished,
and none after the first page that created nothing. The new tasks' records are written in the
transaction; the caller publishes them after it commits (`NewTask`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.db import BatchRecord, TaskRecord, UtcDateTime, batch_columns, task_columns, utcnow

FINAL = ("SUCCESS", "FAILURE", "REVOKED")
# A batch keeps the errors of this many failed pages in its own error.
MAX_BATCH_ERRORS = 20
_COUNTERS = {
    "SUCCESS": BatchRecord.pages_succeeded,
    "FAILURE": BatchRecord.pages_failed,
    "REVOKED": BatchRecord.pages_cancelled,
}
# What a batch sums over its pages.
_SUMS = (BatchRecord.found, BatchRecord.created, BatchRecord.updated, BatchRecord.skipped)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a task ended: one of FINAL, with what it stored or why not."""

    status: str
    found: int | None = None
    created: int | None = None
    updated: int | None = None
    skipped: int | None = None
    error: str | None = None
    not_modified: bool | None = None


@dataclass(frozen=True, slots=True)
class NewTask:
    """A page an "until known" batch enqueued: recorded, to be published by the caller."""

    id: str
    page: int
    batch_id: str
    client: str


@dataclass(slots=True)
class Finished:
    """What `finish` did: whether this call counted the task, and for which batch."""

    counted: bool = False
    batch_id: str | None = None
    new_tasks: list[NewTask] = field(default_factory=list)
    # The task's record as this finish left it (`core.db.task_columns`), when it counted it.
    record: dict[str, Any] | None = field(default=None, compare=False)
    # Its batch's record as the finish left it (`core.db.batch_columns`): on the last of the
    # batch's ends in one `finish_many`, whose count moved the batch's row for all of them.
    batch_record: dict[str, Any] | None = field(default=None, compare=False)


# A task's end and a batch's count, built once: a worker runs them for every page, and building
# and keying a statement anew cost it more CPU than running it.
_END = (
    update(TaskRecord)
    .where(TaskRecord.id == bindparam("task_id"), TaskRecord.finished_at.is_(None))
    .values(
        status=bindparam("end_status"),
        error=bindparam("end_error"),
        finished_at=bindparam("end_time", type_=UtcDateTime()),
        found=bindparam("end_found"),
        created=bindparam("end_created"),
        updated=bindparam("end_updated"),
        skipped=bindparam("end_skipped"),
        not_modified=bindparam("end_not_modified"),
    )
    .returning(*TaskRecord.__table__.columns)
)
_COUNT = (
    update(BatchRecord)
    .where(BatchRecord.id == bindparam("batch_id"))
    .values(
        {
            counter: counter + bindparam(f"add_{status.lower()}")
            for status, counter in _COUNTERS.items()
        }
        | {column: column + bindparam(f"add_{column.key}") for column in _SUMS}
    )
    .returning(*BatchRecord.__table__.columns)
)


async def finish(
    conn: AsyncConnection,
    task_id: str,
    outcome: Outcome,
    *,
    window: int,
    now: dt.datetime | None = None,
) -> Finished:
    """End `task_id` with `outcome` unless it has ended already; count it for its batch.

    Call it inside a transaction (`engine.begin()`), which it leaves to the caller to commit.
    """
    (finished,) = await finish_many(conn, [(task_id, outcome)], window=window, now=now)
    return finished


async def finish_many(
    conn: AsyncConnection,
    ends: Sequence[tuple[str, Outcome]],
    *,
    window: int,
    now: dt.datetime | None = None,
) -> list[Finished]:
    """`finish` of each (task id, outcome) in `ends`, in the caller's one transaction: the ends
    a worker's tasks reach together commit once, and those of one batch move its row in one
    UPDATE. What each did, in the order of `ends`; a task named twice is ended (and counted)
    by the first.

    Rows are locked in one order whoever calls (the tasks' by id, then their batches' by id),
    so that two workers ending pages of the same batches never wait on each other in a circle.
    """
    for _, outcome in ends:
        if outcome.status not in FINAL:
            raise ValueError(f"{outcome.status} is not a final state")
    now = now or utcnow()
    done: list[Finished | None] = [None] * len(ends)
    counting: list[tuple[str, int, int, Any]] = []  # (batch id, page, index in ends, row)
    for index in sorted(range(len(ends)), key=lambda i: ends[i][0]):
        task_id, outcome = ends[index]
        values = {
            "end_status": outcome.status,
            "end_error": outcome.error,
            "end_time": now,
            "end_found": outcome.found,
            "end_created": outcome.created,
            "end_updated": outcome.updated,
            "end_skipped": outcome.skipped,
            "end_not_modified": outcome.not_modified,
        }
        ended = (await conn.execute(_END, {"task_id": task_id, **values})).first()
        if ended is None:
            done[index] = Finished()
        elif ended.batch_id is None:
            done[index] = Finished(counted=True, record=task_columns(ended))
        else:
            counting.append((ended.batch_id, ended.page, index, ended))
    by_batch: dict[str, list[tuple[int, int, Any]]] = {}
    for batch_id, page, index, ended in sorted(counting, key=lambda end: end[:3]):
        by_batch.setdefault(batch_id, []).append((page, index, ended))
    for batch_id, pages in by_batch.items():
        ended_pages = [(page, ends[index][1]) for page, index, _ in pages]
        new_tasks, batch = await _count(conn, batch_id, ended_pages, window=window, now=now)
        for _, index, ended in pages:
            # The pages the batch enqueued go to one of its ends, to publish once; the batch's
            # record, which all of them moved, to the last.
            last = index == pages[-1][1]
            done[index] = Finished(
                True, batch_id, new_tasks, task_columns(ended), batch if last else None
            )
            new_tasks = []
    return [finished or Finished() for finished in done]


async def revoke_unstarted(
    conn: AsyncConnection, batch_id: str, task_ids: list[str], *, now: dt.datetime
) -> list[str]:
    """`finish` with REVOKED ("cancelled") for pages of `batch_id` that never started, all in
    one UPDATE of the tasks and one of the batch however many (a CancelBatch of a large batch,
    which page by page waited for the batch's row once a page beside busy workers); the ids of
    those it ended (not those that ended meanwhile). Inside the caller's transaction, as
    `finish`; the batch must be asked to cancel already, so that nothing more is enqueued."""
    if not task_ids:
        return []
    ended = list(
        (
            await conn.execute(
                update(TaskRecord)
                .where(TaskRecord.id.in_(task_ids), TaskRecord.finished_at.is_(None))
                .values(status="REVOKED", error="cancelled", finished_at=now)
                .returning(TaskRecord.id)
            )
        ).scalars()
    )
    if ended:
        await _count(conn, batch_id, [(None, Outcome("REVOKED"))] * len(ended), window=0, now=now)
    return ended


async def _count(
    conn: AsyncConnection,
    batch_id: str,
    ended: Sequence[tuple[int | None, Outcome]],
    *,
    window: int,
    now: dt.datetime,
) -> tuple[list[NewTask], dict[str, Any]]:
    """Count pages of `batch_id` that ended, each (page, or None when unknown; its outcome),
    in one UPDATE of the batch's row however many: counts and errors as if they had ended one
    by one in page order, and the "until known" window moved once, after all of them (so none
    is enqueued when one of them knew every project it listed). The pages enqueued, and the
    batch's record as this left it."""
    added = {
        f"add_{status.lower()}": sum(o.status == status for _, o in ended) for status in _COUNTERS
    } | {
        f"add_{column.key}": sum(getattr(o, column.key) or 0 for _, o in ended) for column in _SUMS
    }
    # The batch row is locked from here to the commit: its pages' ends wait for it in turn.
    batch = (await conn.execute(_COUNT, {"batch_id": batch_id, **added})).one()
    changes: dict[str, Any] = {}
    failures = [(page, outcome) for page, outcome in ended if outcome.status == "FAILURE"]
    error = batch.error
    for failed, (page, outcome) in enumerate(
        failures, start=batch.pages_failed - len(failures) + 1
    ):
        if failed <= MAX_BATCH_ERRORS:
            line = f"page {page}: {outcome.error or 'failed'}"
            error = f"{error}; {line}" if error else line
        elif failed == MAX_BATCH_ERRORS + 1:
            error = f"{error}; and more (ListTasks with its batch_id)"
    if error != batch.error:
        changes["error"] = error
    stop_page = batch.stop_page
    known = [
        page
        for page, outcome in ended
        if page is not None and outcome.status == "SUCCESS" and outcome.created == 0
    ]
    if batch.until_known and known:
        stop_page = min(known if stop_page is None else [*known, stop_page])
        changes["stop_page"] = stop_page
    new_tasks: list[NewTask] = []
    if batch.until_known and stop_page is None and batch.cancel_requested_at is None:
        new_tasks = await _enqueue_window(conn, batch, window, now)
        if new_tasks:
            changes["next_page"] = new_tasks[-1].page + 1
            changes["pages_total"] = batch.pages_total + len(new_tasks)
    done = batch.pages_succeeded + batch.pages_failed + batch.pages_cancelled
    if not new_tasks and done == batch.pages_total:
        # When its last page ended: `now` was taken before this finish waited for the batch's
        # row, so a page another finish (a cancel) ended meanwhile may have ended after it.
        latest = (
            await conn.execute(
                select(func.max(TaskRecord.finished_at)).where(TaskRecord.batch_id == batch_id)
            )
        ).scalar_one_or_none()
        changes["finished_at"] = now if latest is None else max(now, latest)
    if changes:
        await conn.execute(update(BatchRecord).where(BatchRecord.id == batch_id).values(changes))
    return new_tasks, batch_columns(batch) | changes


async def _enqueue_window(
    conn: AsyncConnection, batch: Any, window: int, now: dt.datetime
) -> list[NewTask]:
    lowest_unfinished = (
        await conn.execute(
            select(func.min(TaskRecord.page)).where(
                TaskRecord.batch_id == batch.id, TaskRecord.finished_at.is_(None)
            )
        )
    ).scalar_one_or_none()
    lowest = batch.next_page if lowest_unfinished is None else lowest_unfinished
    last = min(batch.last_page, lowest + window - 1)
    pages = range(batch.next_page, last + 1)
    new_tasks = [NewTask(str(uuid.uuid4()), page, batch.id, batch.client) for page in pages]
    if new_tasks:
        await conn.execute(insert(TaskRecord), [task_row(task, now) for task in new_tasks])
    return new_tasks


def task_row(task: NewTask, now: dt.datetime) -> dict[str, Any]:
    """The record of a batch's page, not yet confirmed by the broker."""
    return {
        "id": task.id,
        "client": task.client,
        "request_id": None,
        "page": task.page,
        "batch_id": task.batch_id,
        "enqueued_at": now,
        "published_at": None,
        "deliveries": 0,
    }

"""What the worker writes to the database: projects (upserted by link), task starts and ends,
and each page's memo for its next, conditional, harvest.

One INSERT ... ON CONFLICT DO UPDATE per batch, never a round trip per row; rows are sorted by
link so concurrent workers lock them in the same order and do not deadlock. A batch that
created or changed rows stamps them with the next revision of the feed (`core.db.Feed`), which
orders WatchProjects by commit: on PostgreSQL the upsert itself bumps it and stamps them, on
SQLite the transaction's last statements do. Locks, deadlocks, serialization failures and lost
connections are retried briefly here and then leave as `RetryableError`, so Celery tries the
task again instead of failing it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Integer, bindparam, case, delete, func, literal_column, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.db import (
    MAX_URL_LENGTH,
    BatchRecord,
    Feed,
    PageMemo,
    Project,
    TaskRecord,
    UtcDateTime,
    dialect_insert,
    is_transient,
    single_statement,
    sqlstate,
    task_columns,
    utcnow,
)
from core.ledger import Finished, Outcome, finish_many
from worker.errors import RetryableError
from worker.parse import ProjectItem

LOCAL_ATTEMPTS = 3
LOCAL_BACKOFF_SECONDS = 0.05
STATEMENT_TIMED_OUT = "57014"  # query_canceled, as statement_timeout cancels

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoreCounts:
    created: int = 0
    updated: int = 0
    unstorable: int = 0  # links longer than MAX_URL_LENGTH bytes
    # The feed revision of the last batch that changed rows (0: none did); not a count, so
    # counts compare equal whatever the feed's clock says.
    revision: int = field(default=0, compare=False)


async def _with_retries(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    *,
    transaction: bool = False,
) -> T:
    """Run `work` (one statement, or a transaction), retrying transient failures a few times."""
    for attempt in range(1, LOCAL_ATTEMPTS + 1):
        try:
            connection = engine.begin() if transaction else single_statement(engine)
            async with connection as conn:
                return await work(conn)
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            # A statement past its statement_timeout: the database is too slow, not contended,
            # and trying again at once would only wait as long again.
            if attempt == LOCAL_ATTEMPTS or sqlstate(exc) == STATEMENT_TIMED_OUT:
                raise RetryableError(f"database busy or unreachable: {exc.orig!r}") from exc
        except (OSError, PoolTimeout) as exc:
            # No answer within its bound (TimeoutError): the database hangs; the task's next
            # try waits for it, not this one (see worker.runtime's statement bound).
            if attempt == LOCAL_ATTEMPTS or isinstance(exc, TimeoutError):
                raise RetryableError(f"database unreachable or busy: {exc!r}") from exc
        await asyncio.sleep(LOCAL_BACKOFF_SECONDS * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


# Bumps the feed's revision and takes its row lock, held until the commit (`core.db.Feed`).
# Without bound parameters, so that it can be the upsert's CTE: insertmanyvalues needs a
# row's parameters side by side, and a CTE's would come between them.
_ONE = literal_column("1", Integer())
_NEXT_REVISION = (
    update(Feed)
    .where(Feed.id == _ONE)
    .values(revision=Feed.revision + _ONE)
    .returning(Feed.revision)
)


def _upsert_stamps(dialect: str) -> bool:
    """Whether the upsert stamps the rows itself; SQLite has no UPDATE within WITH."""
    return dialect == "postgresql"


@functools.cache
def upsert_statement(dialect: str, stamp: bool = True) -> Any:
    """The batch upsert; on PostgreSQL (unless `stamp` is false) it also stamps the rows it
    creates or changes with the feed's next revision, which it bumps first in a CTE.

    One statement writes each row once: a stamp after the upsert wrote every new or changed row
    a second time (an UPDATE by id that PostgreSQL planned as a scan of the whole table while
    the table was young). The feed's row lock is then held from the statement's start to its
    commit, as long as the stamp after it held it before; a batch that changes nothing takes it
    too, and moves the feed by a revision no row has. SQLite has no UPDATE within WITH: there
    the rows are stamped after the upsert (`stamp_revision`), in its transaction.
    """
    # Executed with a list of rows, so SQLAlchemy compiles it once and sends each batch as one
    # multi-row INSERT ("insertmanyvalues"); a `.values(rows)` statement would be compiled anew
    # for every batch (several times slower on SQLite; bench/README.md has the figure).
    statement = dialect_insert(dialect)(Project)
    stamp = stamp and _upsert_stamps(dialect)
    if stamp:
        next_revision = _NEXT_REVISION.cte("next_revision")
        statement = statement.add_cte(next_revision).values(
            revision=select(next_revision.c.revision).scalar_subquery()
        )
    new = statement.excluded
    changed = or_(
        Project.title != new.title,
        Project.description != new.description,
        Project.is_active != new.is_active,
        Project.start_date.is_distinct_from(new.start_date),
    )
    set_: dict[str, Any] = {
        "title": new.title,
        "description": new.description,
        "is_active": new.is_active,
        "start_date": new.start_date,
        "last_seen_at": new.last_seen_at,
        "updated_at": case((changed, new.updated_at), else_=Project.updated_at),
    }
    if stamp:
        set_["revision"] = case((changed, new.revision), else_=Project.revision)
    return statement.on_conflict_do_update(index_elements=[Project.url], set_=set_).returning(
        Project.id, Project.first_seen_at, Project.updated_at, Project.revision
    )


async def stamp_revision(conn: AsyncConnection, project_ids: list[int]) -> int:
    """Give these rows, changed in `conn`'s open transaction, the feed's next revision (SQLite:
    on PostgreSQL the upsert stamps them itself)."""
    revision = int((await conn.execute(_NEXT_REVISION)).scalar_one())
    await conn.execute(update(Project).where(Project.id.in_(project_ids)).values(revision=revision))
    return revision


async def store_projects(
    engine: AsyncEngine, items: Sequence[ProjectItem], batch_size: int
) -> StoreCounts:
    """Insert new projects and refresh known ones; count what was created and what changed."""
    latest = {item.url: item for item in items}  # a link listed twice is stored once, last wins
    # Bounded in bytes: PostgreSQL's unique index refuses keys past ~2.7 KB, whatever the chars.
    storable = sorted(url for url in latest if len(url.encode()) <= MAX_URL_LENGTH)
    created = updated = revision = 0
    dialect = engine.dialect.name
    stamped = _upsert_stamps(dialect)
    for start in range(0, len(storable), batch_size):
        # `now` marks this statement's writes: a row that comes back with first_seen_at == now
        # was inserted by it, one with updated_at == now was changed by it.
        now = utcnow()
        rows = [
            {
                "url": url,
                "title": latest[url].title,
                "description": latest[url].description,
                "is_active": latest[url].is_active,
                "start_date": latest[url].start_date,
                "first_seen_at": now,
                "last_seen_at": now,
                "updated_at": now,
            }
            for url in storable[start : start + batch_size]
        ]

        async def upsert(
            conn: AsyncConnection, rows: list[dict[str, Any]] = rows, now: dt.datetime = now
        ) -> tuple[list[Any], int]:
            # All the rows in one INSERT, not split into statements of SQLAlchemy's default
            # 1,000 rows that would each bump the feed and commit apart (UPSERT_BATCH_SIZE is
            # bounded so that SQLAlchemy's own bound of parameters a statement splits none).
            pages = {"insertmanyvalues_page_size": len(rows)}
            returned = list(
                await conn.execute(upsert_statement(dialect), rows, execution_options=pages)
            )
            changed = [row for row in returned if row.updated_at == now]
            if not changed:
                return returned, 0
            if stamped:
                return returned, max(int(row.revision) for row in changed)
            return returned, await stamp_revision(conn, [row.id for row in changed])

        # PostgreSQL's upsert is one statement, stamp included: no transaction around it.
        returned, batch_revision = await _with_retries(engine, upsert, transaction=not stamped)
        revision = batch_revision or revision
        batch_created = sum(1 for row in returned if row.first_seen_at == now)
        created += batch_created
        updated += sum(1 for row in returned if row.updated_at == now) - batch_created
    return StoreCounts(created, updated, len(latest) - len(storable), revision)


@dataclass(frozen=True, slots=True)
class TaskStart:
    """What the record of a task said as a worker started it."""

    deliveries: int  # starts counted so far, this one included (0: the gateway has no record)
    cancelled: bool = False  # a cancel was asked for
    finished: bool = False  # it has its final state already (a cancel before it started)
    batch_id: str | None = None
    # The record as this start left it (`core.db.task_columns`), for its event to carry.
    record: dict[str, Any] | None = field(default=None, compare=False)
    # This start wrote its batch's start time (the batch's first start); no other moves the
    # batch's record.
    batch_started: bool = False


# The statements of every page (a start here, the cancel check and the memo below), built once:
# building and keying one anew each call cost a worker more CPU than executing it
# (bench/README.md, "Figures behind the code's comments").
_START = (
    update(TaskRecord)
    .where(TaskRecord.id.in_(bindparam("task_ids", expanding=True)))
    .values(
        deliveries=TaskRecord.deliveries + 1,
        # A task that ended before it started (cancelled) was never started.
        started_at=case(
            (
                TaskRecord.finished_at.is_(None),
                func.coalesce(TaskRecord.started_at, bindparam("started", type_=UtcDateTime())),
            ),
            else_=TaskRecord.started_at,
        ),
        status=case((TaskRecord.finished_at.is_(None), "STARTED"), else_=TaskRecord.status),
    )
    .returning(
        *TaskRecord.__table__.columns,
        select(BatchRecord.started_at)
        .where(BatchRecord.id == TaskRecord.batch_id)
        .scalar_subquery()
        .label("batch_started_at"),
    )
)


async def start_tasks(
    engine: AsyncEngine, task_ids: Sequence[str], now: dt.datetime | None = None
) -> dict[str, TaskStart]:
    """Count one more start of each of `task_ids` (distinct) and mark them STARTED, unless they
    have ended: one UPDATE for all. A task the gateway has no record of is left out."""
    if len(set(task_ids)) != len(task_ids):
        raise ValueError("a task started twice in one statement would be counted once")
    started = now or utcnow()

    async def mark(conn: AsyncConnection) -> dict[str, TaskStart]:
        rows = (await conn.execute(_START, {"task_ids": list(task_ids), "started": started})).all()
        # Only a batch's first start writes its row: the pages' ends lock that row to count
        # themselves, and every start waiting on them would queue behind the batch's ends.
        unstarted_batches = {
            row.batch_id
            for row in rows
            if row.batch_id is not None and row.finished_at is None and row.batch_started_at is None
        }
        if unstarted_batches:
            await conn.execute(
                update(BatchRecord)
                .where(BatchRecord.id.in_(unstarted_batches), BatchRecord.started_at.is_(None))
                .values(started_at=started)
            )
        return {
            row.id: TaskStart(
                int(row.deliveries),
                row.cancel_requested_at is not None,
                row.finished_at is not None,
                row.batch_id,
                task_columns(row),
                row.batch_id in unstarted_batches,
            )
            for row in rows
        }

    # Each statement commits by itself: the batch's start time is set once, whoever sets it.
    return await _with_retries(engine, mark)


async def start_task(
    engine: AsyncEngine, task_id: str, now: dt.datetime | None = None
) -> TaskStart:
    """Count one more start of `task_id` and mark it STARTED (unless it has ended)."""
    return (await start_tasks(engine, [task_id], now)).get(task_id, TaskStart(0))


async def record_start(engine: AsyncEngine, task_id: str, now: dt.datetime | None = None) -> int:
    """Count one more start of `task_id`; the new count (0 when the gateway has no record)."""
    return (await start_task(engine, task_id, now)).deliveries


_CANCEL_REQUESTED = select(TaskRecord.cancel_requested_at).where(
    TaskRecord.id == bindparam("task_id")
)
_PAGE_MEMO = select(PageMemo.etag, PageMemo.last_modified, PageMemo.links).where(
    PageMemo.url == bindparam("page_url")
)
_FORGET_PAGE = delete(PageMemo).where(PageMemo.url == bindparam("page_url"))


async def cancel_requested(engine: AsyncEngine, task_id: str) -> bool:
    """Whether a cancel of `task_id` has been asked for (the check before a task stores)."""

    async def read(conn: AsyncConnection) -> bool:
        row = (await conn.execute(_CANCEL_REQUESTED, {"task_id": task_id})).first()
        return row is not None and row.cancel_requested_at is not None

    return await _with_retries(engine, read)


async def record_retry(engine: AsyncEngine, task_id: str, error: str) -> dict[str, Any] | None:
    """Mark `task_id` RETRY with why (unless it has ended); the record as that left it
    (`core.db.task_columns`), or None when nothing was marked."""

    async def mark(conn: AsyncConnection) -> dict[str, Any] | None:
        row = (
            await conn.execute(
                update(TaskRecord)
                .where(TaskRecord.id == task_id, TaskRecord.finished_at.is_(None))
                .values(status="RETRY", error=error)
                .returning(*TaskRecord.__table__.columns)
            )
        ).first()
        return None if row is None else task_columns(row)

    return await _with_retries(engine, mark)


async def finish_tasks(
    engine: AsyncEngine, ends: Sequence[tuple[str, Outcome]], window: int
) -> list[Finished]:
    """`core.ledger.finish_many` in a transaction of its own, retried like every store."""

    async def end(conn: AsyncConnection) -> list[Finished]:
        return await finish_many(conn, ends, window=window)

    return await _with_retries(engine, end, transaction=True)


async def mark_published(engine: AsyncEngine, task_ids: list[str]) -> None:
    """Say that the broker has these tasks (pages an "until known" batch enqueued)."""

    async def mark(conn: AsyncConnection) -> None:
        await conn.execute(
            update(TaskRecord).where(TaskRecord.id.in_(task_ids)).values(published_at=utcnow())
        )

    await _with_retries(engine, mark)


@dataclass(frozen=True, slots=True)
class RememberedPage:
    """A page's memo: the validators of its last answer and the links it listed then."""

    etag: str | None
    last_modified: str | None
    links: list[str]


async def load_page_memo(engine: AsyncEngine, url: str) -> RememberedPage | None:
    async def read(conn: AsyncConnection) -> RememberedPage | None:
        memo = (await conn.execute(_PAGE_MEMO, {"page_url": url})).first()
        if memo is None:
            return None
        return RememberedPage(memo.etag, memo.last_modified, list(json.loads(memo.links)))

    return await _with_retries(engine, read)


async def remember_page(
    engine: AsyncEngine, url: str, etag: str | None, last_modified: str | None, links: list[str]
) -> None:
    """Keep what the page's answer said to send next time; forget the page when it said
    nothing (no validators: its next harvest is a plain GET anyway)."""

    async def write(conn: AsyncConnection) -> None:
        if not (etag or last_modified):
            await conn.execute(_FORGET_PAGE, {"page_url": url})
            return
        values = {
            "url": url,
            "etag": etag,
            "last_modified": last_modified,
            "links": json.dumps(links),
            "fetched_at": utcnow(),
        }
        await conn.execute(_remember_statement(engine.dialect.name), values)

    if len(url.encode()) <= MAX_URL_LENGTH:
        await _with_retries(engine, write)


_MEMO_COLUMNS = ("etag", "last_modified", "links", "fetched_at")


@functools.cache
def _remember_statement(dialect: str) -> Any:
    statement = dialect_insert(dialect)(PageMemo)
    return statement.on_conflict_do_update(
        index_elements=[PageMemo.url],
        set_={name: statement.excluded[name] for name in _MEMO_COLUMNS},
    )


async def refresh_seen(engine: AsyncEngine, links: Sequence[str], batch_size: int) -> None:
    """Mark these projects seen now (a 304: the page lists what it listed last time). Being
    seen again is no change: no revision, nothing for the feed."""
    now = utcnow()
    unique = sorted(set(links))  # locked in link order, like the upsert
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]

        async def touch(conn: AsyncConnection, chunk: list[str] = chunk) -> None:
            await conn.execute(
                update(Project).where(Project.url.in_(chunk)).values(last_seen_at=now)
            )

        await _with_retries(engine, touch, transaction=True)

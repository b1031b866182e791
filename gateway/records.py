"""The gateway's record of the tasks it issued, kept in the database so every instance sees it.

A record says who asked for which page, under which request_id, when, and whether the broker
has confirmed it; it is what makes an unknown or expired id NOT_FOUND instead of Celery's
endless PENDING, and a repeated request_id return the task it first created. Database outages
leave this module as `StoreUnavailable` (`gateway.database`).

Records are read together: the reads that arrive while one runs (or in the same event-loop
turn) are one `WHERE id IN (...)` (`core.batching.Batcher`); request_ids are claimed together
the same way, in one INSERT (a transaction of its own per claim cost an Upload with a
request_id three times the CPU of one without). One event batch from a worker
(64 tasks started at once) wakes as many WatchStatus streams, each reading its record at
once; read one by one, they queued for the pool's connections behind one another.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, delete, func, insert, literal, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from core.batching import Batcher
from core.db import BatchRecord, TaskRecord, UtcDateTime, dialect_insert, single_statement, utcnow
from core.ledger import Outcome, finish, finish_many
from gateway.database import store_errors
from gateway.errors import StoreUnavailable
from gateway.health import OnUnavailable, nobody

# The most records one read asks for, or one claim writes; more waiting go in the next.
MAX_READ_TOGETHER = 500
MAX_CLAIMS_TOGETHER = 256
# Tries of a claim whose request_id's holder keeps going or changing under it.
CLAIM_TRIES = 5


@dataclass(frozen=True, slots=True)
class IssuedTask:
    id: str
    client: str
    request_id: str | None
    page: int
    enqueued_at: dt.datetime
    published_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    lost_reason: str | None = None
    batch_id: str | None = None
    # What the worker (or the gateway's own verdict) recorded; final once finished_at is set.
    status: str = "PENDING"
    error: str | None = None
    finished_at: dt.datetime | None = None
    found: int | None = None
    created: int | None = None
    updated: int | None = None
    skipped: int | None = None
    not_modified: bool | None = None
    cancel_requested_at: dt.datetime | None = None
    deliveries: int = 0  # starts counted by the workers

    @property
    def progress(self) -> tuple[int, int, int]:
        """How far the record has come: every write that changes what a watcher is sent (a
        start, a retry, the final state) moves it forward, and only those do."""
        if self.finished_at is not None:
            return (1, 0, 0)
        return (0, self.deliveries, int(self.status == "RETRY"))

    @classmethod
    def new(cls, client: str, request_id: str | None, page: int) -> IssuedTask:
        """A task about to be issued now.

        Only a repeat of a request_id ever waits for the publish to be confirmed, so only such
        a record starts unconfirmed; the others save the write (a failed publish drops them).
        """
        now = utcnow()
        return cls(str(uuid.uuid4()), client, request_id, page, now, None if request_id else now)

    def as_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "client": self.client,
            "request_id": self.request_id,
            "page": self.page,
            "enqueued_at": self.enqueued_at,
            "published_at": self.published_at,
            "deliveries": 0,
            "batch_id": self.batch_id,
        }

    @classmethod
    def from_row(cls, row: Row[Any]) -> IssuedTask:
        return cls(
            id=row.id,
            client=row.client,
            request_id=row.request_id,
            page=row.page,
            enqueued_at=row.enqueued_at,
            published_at=row.published_at,
            started_at=row.started_at,
            lost_reason=row.lost_reason,
            batch_id=row.batch_id,
            status=row.status,
            error=row.error,
            finished_at=row.finished_at,
            found=row.found,
            created=row.created,
            updated=row.updated,
            skipped=row.skipped,
            not_modified=row.not_modified,
            cancel_requested_at=row.cancel_requested_at,
            deliveries=row.deliveries,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> IssuedTask | None:
        """The task from the record a TaskChanged carried (`core.events.record_json`); None
        when it is not one."""
        try:
            values = {name: record[name] for name in cls.__dataclass_fields__}
            for name in _TIMES:
                if values[name] is not None:
                    values[name] = dt.datetime.fromisoformat(values[name]).astimezone(dt.UTC)
            return cls(**values)
        except (KeyError, TypeError, ValueError):
            return None


_TIMES = ("enqueued_at", "published_at", "started_at", "finished_at", "cancel_requested_at")


@dataclass(slots=True)
class _Read:
    client: str
    task_id: str
    found: IssuedTask | None = None


@dataclass(slots=True)
class _Claim:
    new: IssuedTask  # the record it makes if its request_id is free
    claimed: tuple[IssuedTask, bool] | None = None


class TaskRecords:
    def __init__(
        self,
        engine: AsyncEngine,
        lifetime: dt.timedelta,
        on_unavailable: OnUnavailable = nobody,
    ) -> None:
        self._engine = engine
        self._lifetime = lifetime
        self._on_unavailable = on_unavailable
        self._insert = dialect_insert(engine.dialect.name)
        # Built once: a statement built per batch costs its construction and cache key anew.
        self._add_statement = insert(TaskRecord)
        self._reads = Batcher(self._read_together, max_size=MAX_READ_TOGETHER)
        self._claim_statement = (
            self._insert(TaskRecord)
            .on_conflict_do_nothing(index_elements=["client", "request_id"])
            .returning(TaskRecord.id)
        )
        self._claims = Batcher(self._claim_together, max_size=MAX_CLAIMS_TOGETHER)

    def _expired(self, task: IssuedTask, now: dt.datetime) -> bool:
        return task.enqueued_at + self._lifetime < now

    async def add_many(self, tasks: list[IssuedTask]) -> None:
        """Store the records of new tasks without a request_id, in one INSERT."""
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            await conn.execute(self._add_statement, [task.as_row() for task in tasks])

    async def claim(self, client: str, request_id: str, page: int) -> tuple[IssuedTask, bool]:
        """A new record for this request_id, or the live one that already holds it.

        The second item is True when the record is new (the caller must publish the task).
        Concurrent claims of one request_id make exactly one record: the insert skips on the
        unique (client, request_id) constraint and the losers read the winner's row. Claimed
        with the others that arrive meanwhile (`_claim_together`).
        """
        claim = _Claim(IssuedTask.new(client, request_id, page))
        await self._claims.submit(claim)
        assert claim.claimed is not None
        return claim.claimed

    async def _claim_together(self, claims: list[_Claim]) -> list[BaseException | None]:
        """One INSERT for every claim's record, then one read of the rows that held theirs.

        A request_id claimed twice in one batch is one row: the later claims get the first's
        task, as they would from another call. An expired holder, or one gone before it was
        read (dropped after a failed publish), is settled by a claim of its own (`_claim_alone`).
        Each claim hears its own outcome: once the INSERT has committed, a failure after it
        fails only the claims it concerns, never one whose record was written.
        """
        first: dict[tuple[str, str | None], _Claim] = {}
        for claim in claims:
            first.setdefault((claim.new.client, claim.new.request_id), claim)
        # In key order, so that two gateways' INSERTs wait for each other's rows in one order
        # (a multi-row INSERT waits on every uncommitted row it conflicts with: no deadlock).
        ordered = sorted(first.items(), key=lambda item: (item[0][0], item[0][1] or ""))
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            inserted = await conn.execute(
                self._claim_statement, [claim.new.as_row() for _, claim in ordered]
            )
            made = set(inserted.scalars())
        for claim in first.values():
            if claim.new.id in made:
                claim.claimed = (claim.new, True)
        held = [key for key, claim in first.items() if claim.claimed is None]
        errors: dict[tuple[str, str | None], BaseException] = {}
        rows: dict[tuple[str, str | None], Any] = {}
        if held:
            statement = select(TaskRecord).where(
                tuple_(TaskRecord.client, TaskRecord.request_id).in_(held)
            )
            try:
                async with (
                    store_errors(self._on_unavailable),
                    single_statement(self._engine) as conn,
                ):
                    rows = {(r.client, r.request_id): r for r in await conn.execute(statement)}
            except StoreUnavailable as exc:
                errors = dict.fromkeys(held, exc)
        for key in held:
            if key in errors:
                continue
            claim = first[key]
            row = rows.get(key)
            if row is not None and not self._expired(
                existing := IssuedTask.from_row(row), claim.new.enqueued_at
            ):
                claim.claimed = (existing, False)
                continue
            try:
                claim.claimed = await self._claim_alone(claim.new)
            except Exception as exc:
                errors[key] = exc
        outcome: list[BaseException | None] = []
        for claim in claims:
            key = (claim.new.client, claim.new.request_id)
            winner = first[key]
            if claim is not winner and winner.claimed is not None:  # a repeat within the batch
                claim.claimed = (winner.claimed[0], False)
            outcome.append(errors.get(key))
        return outcome

    async def _claim_alone(self, new: IssuedTask) -> tuple[IssuedTask, bool]:
        """`claim` in a transaction of its own: replaces an expired holder of the request_id,
        and tries again when the holder went, or another claim replaced it, meanwhile."""
        holder = (TaskRecord.client == new.client) & (TaskRecord.request_id == new.request_id)
        row_of_new = new.as_row()
        for _ in range(CLAIM_TRIES):
            async with store_errors(self._on_unavailable), self._engine.begin() as conn:
                if (await conn.execute(self._claim_statement, row_of_new)).first() is not None:
                    return new, True
                row = (await conn.execute(select(TaskRecord).where(holder))).first()
                if row is None:
                    continue
                existing = IssuedTask.from_row(row)
                if not self._expired(existing, new.enqueued_at):
                    return existing, False
                # The old task's record has expired: the request_id is free again, unless
                # another claim has just taken it (then the next try reads that one).
                gone = await conn.execute(
                    delete(TaskRecord).where(TaskRecord.id == existing.id).returning(TaskRecord.id)
                )
                if (
                    gone.first() is not None
                    and (await conn.execute(self._claim_statement, row_of_new)).first()
                ):
                    return new, True
        raise StoreUnavailable(f"request_id {new.request_id!r} changed hands {CLAIM_TRIES} times")

    async def get(self, client: str, task_id: str) -> IssuedTask | None:
        """The client's live record of `task_id`, or None (never issued to it, or expired).

        Read with the other records asked for meanwhile; the read begins after this call, so
        it sees every commit made before it.
        """
        read = _Read(client, task_id)
        await self._reads.submit(read)
        return read.found

    async def _read_together(self, reads: list[_Read]) -> None:
        ids = list({read.task_id for read in reads})
        statement = select(TaskRecord).where(TaskRecord.id.in_(ids))
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            rows = {row.id: row for row in await conn.execute(statement)}
        now = utcnow()
        for read in reads:
            row = rows.get(read.task_id)
            if row is not None and row.client == read.client:
                task = IssuedTask.from_row(row)
                read.found = None if self._expired(task, now) else task

    async def mark_published(self, task_ids: list[str]) -> None:
        """Say that the broker has these tasks, so repeats of their request_ids stop waiting."""
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            await conn.execute(
                update(TaskRecord).where(TaskRecord.id.in_(task_ids)).values(published_at=utcnow())
            )

    async def forget_many(self, task_ids: list[str]) -> set[str]:
        """Drop the records of tasks whose publish failed, unless a worker has started one
        meanwhile (a message that reached the broker although its answer did not reach us).

        The ids that were started and kept. A worker runs no task without a record
        (`worker.task`), so a message delivered after its record was dropped (a write that
        sat in a socket through a partition) never runs: "nothing was enqueued" holds.
        """
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            await conn.execute(
                delete(TaskRecord).where(TaskRecord.id.in_(task_ids), TaskRecord.deliveries == 0)
            )
            # What is left was started (a record already gone is not "started"): read after
            # the DELETE has committed, not in its snapshot.
            kept = await conn.execute(select(TaskRecord.id).where(TaskRecord.id.in_(task_ids)))
            return set(kept.scalars())

    async def purge_expired(self) -> int:
        """Drop the task and batch records older than their lifetime; how many tasks went."""
        cutoff = utcnow() - self._lifetime
        async with store_errors(self._on_unavailable), self._engine.begin() as conn:
            result = await conn.execute(delete(TaskRecord).where(TaskRecord.enqueued_at < cutoff))
            await conn.execute(delete(BatchRecord).where(BatchRecord.enqueued_at < cutoff))
        return int(result.rowcount or 0)

    async def unstarted_before(self, cutoff: dt.datetime) -> list[IssuedTask]:
        """Tasks enqueued before `cutoff` that no worker has started, not yet judged lost."""
        async with store_errors(self._on_unavailable), self._engine.connect() as conn:
            rows = await conn.execute(
                select(TaskRecord).where(
                    TaskRecord.enqueued_at < cutoff,
                    TaskRecord.started_at.is_(None),
                    TaskRecord.finished_at.is_(None),
                )
            )
            return [IssuedTask.from_row(row) for row in rows]

    async def mark_lost(self, reasons: dict[str, str]) -> None:
        """End these never-started tasks FAILURE, saying why they will not run."""
        async with store_errors(self._on_unavailable), self._engine.begin() as conn:
            lost = []
            # Rows locked as a worker's ends lock them (tasks by id, then their batches by id:
            # `core.ledger.finish_many`), so that the two never wait on each other in a circle.
            for task_id in sorted(reasons):
                ended = await conn.execute(
                    update(TaskRecord)
                    .where(TaskRecord.id == task_id, TaskRecord.started_at.is_(None))
                    .values(lost_reason=reasons[task_id])
                )
                if ended.rowcount:
                    lost.append((task_id, Outcome("FAILURE", error=reasons[task_id])))
            # No further page of an "until known" batch is enqueued from here.
            await finish_many(conn, lost, window=0)

    async def cancel(self, client: str, task_id: str) -> IssuedTask | None:
        """Ask for `task_id` to be cancelled; end it REVOKED at once if it has not started.

        The task as it is then, or None when it was never issued to `client` (or expired). A
        task that has ended is returned as it ended: the caller tells a second cancel from a
        cancel of a finished task.
        """
        now = utcnow()
        async with store_errors(self._on_unavailable), self._engine.begin() as conn:
            asked = (
                await conn.execute(
                    update(TaskRecord)
                    .where(
                        TaskRecord.id == task_id,
                        TaskRecord.client == client,
                        TaskRecord.finished_at.is_(None),
                    )
                    .values(cancel_requested_at=func.coalesce(TaskRecord.cancel_requested_at, now))
                    .returning(TaskRecord.started_at)
                )
            ).first()
            if asked is not None and asked.started_at is None:
                await finish(conn, task_id, Outcome("REVOKED", error="cancelled"), window=0)
        return await self.get(client, task_id)

    async def page(
        self,
        client: str,
        status: str | None,
        batch_id: str | None,
        after: tuple[dt.datetime, str] | None,
        limit: int,
    ) -> list[IssuedTask]:
        """Up to `limit` of the client's live tasks, newest first, after the key `after`."""
        statement = select(TaskRecord).where(
            TaskRecord.client == client,
            TaskRecord.enqueued_at >= literal(utcnow() - self._lifetime, UtcDateTime()),
        )
        if status is not None:
            statement = statement.where(TaskRecord.status == status)
        if batch_id is not None:
            statement = statement.where(TaskRecord.batch_id == batch_id)
        if after is not None:
            key = tuple_(literal(after[0], UtcDateTime()), literal(after[1], TaskRecord.id.type))
            statement = statement.where(tuple_(TaskRecord.enqueued_at, TaskRecord.id) < key)
        statement = statement.order_by(TaskRecord.enqueued_at.desc(), TaskRecord.id.desc()).limit(
            limit
        )
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            return [IssuedTask.from_row(row) for row in await conn.execute(statement)]

    async def ping(self) -> bool:
        try:
            async with store_errors(self._on_unavailable), self._engine.connect() as conn:
                await conn.execute(select(1))
        except StoreUnavailable:
            return False
        return True

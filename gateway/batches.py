"""The gateway's record of batches (UploadPages): made with their first pages, read, cancelled.

A batch's row and the records of the pages it enqueues at once are written in one
transaction, then the pages are issued like any Upload (`gateway.issuing`). Its counts move
only in `core.ledger`, as its pages finish. Database outages leave as `StoreUnavailable`.
Batches are read together, as tasks are (`gateway.records`): the streams one event wakes read
their rows in one query.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from core.batching import Batcher
from core.db import BatchRecord, TaskRecord, dialect_insert, single_statement, utcnow
from core.ledger import NewTask, revoke_unstarted, task_row
from gateway.database import retry_contended, store_errors
from gateway.health import OnUnavailable, nobody
from gateway.records import MAX_READ_TOGETHER


@dataclass(frozen=True, slots=True)
class StoredBatch:
    id: str
    client: str
    request_id: str | None
    first_page: int
    last_page: int
    until_known: bool
    stop_page: int | None
    next_page: int
    pages_total: int
    pages_succeeded: int
    pages_failed: int
    pages_cancelled: int
    found: int
    created: int
    updated: int
    skipped: int
    error: str | None
    enqueued_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    cancel_requested_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> StoredBatch:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StoredBatch | None:
        """The batch from the record a TaskChanged carried (`core.events.record_json`); None
        when it is not one."""
        try:
            values = {name: record[name] for name in cls.__dataclass_fields__}
            for name in _TIMES:
                if values[name] is not None:
                    values[name] = dt.datetime.fromisoformat(values[name]).astimezone(dt.UTC)
            return cls(**values)
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def progress(self) -> tuple[int, int, int, int, int]:
        """How far the record has come. Its row changes one write at a time, and each of these
        only grows with every write that changes what a watcher is sent (an error comes with a
        failed page, a stop page with a page done), so a later record compares greater."""
        done = self.pages_succeeded + self.pages_failed + self.pages_cancelled
        return (
            int(self.finished_at is not None),
            int(self.cancel_requested_at is not None),
            done,
            self.pages_total,
            int(self.started_at is not None),
        )

    @property
    def status(self) -> str:
        """PENDING, STARTED, SUCCESS, FAILURE or REVOKED, from the counts."""
        if self.cancel_requested_at is not None:
            return "REVOKED"
        if self.finished_at is not None:
            return "FAILURE" if self.pages_failed else "SUCCESS"
        return "PENDING" if self.started_at is None else "STARTED"


_TIMES = ("enqueued_at", "started_at", "finished_at", "cancel_requested_at")


@dataclass(slots=True)
class _Read:
    client: str
    batch_id: str
    found: StoredBatch | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    batch: StoredBatch
    created: bool  # False: the request_id's batch made by an earlier call
    pages: list[NewTask]  # the pages to issue now (empty unless created)


class BatchRecords:
    def __init__(
        self, engine: AsyncEngine, lifetime: dt.timedelta, on_unavailable: OnUnavailable = nobody
    ) -> None:
        self._engine = engine
        self._lifetime = lifetime
        self._on_unavailable = on_unavailable
        self._insert = dialect_insert(engine.dialect.name)
        self._reads = Batcher(self._read_together, max_size=MAX_READ_TOGETHER)

    async def create(
        self,
        client: str,
        request_id: str | None,
        first_page: int,
        last_page: int,
        *,
        until_known: bool,
        window: int,
    ) -> Claimed:
        """A new batch with the records of its first pages, or the request_id's batch."""
        now = utcnow()
        batch_id = str(uuid.uuid4())
        last_now = min(last_page, first_page + window - 1) if until_known else last_page
        pages = [
            NewTask(str(uuid.uuid4()), page, batch_id, client)
            for page in range(first_page, last_now + 1)
        ]
        row = {
            "id": batch_id,
            "client": client,
            "request_id": request_id,
            "first_page": first_page,
            "last_page": last_page,
            "until_known": until_known,
            "next_page": last_now + 1,
            "pages_total": len(pages),
            "enqueued_at": now,
        }
        async with store_errors(self._on_unavailable), self._engine.begin() as conn:
            if request_id is not None:
                existing = (
                    await conn.execute(
                        select(BatchRecord).where(
                            BatchRecord.client == client, BatchRecord.request_id == request_id
                        )
                    )
                ).first()
                if existing is not None:
                    if existing.enqueued_at + self._lifetime >= now:
                        return Claimed(StoredBatch.from_row(existing), False, [])
                    await conn.execute(delete(BatchRecord).where(BatchRecord.id == existing.id))
            inserted = await conn.execute(
                self._insert(BatchRecord)
                .values(row)
                .on_conflict_do_nothing(index_elements=["client", "request_id"])
                .returning(BatchRecord.id)
            )
            if inserted.first() is None:  # a concurrent call with the request_id won
                winner = (
                    await conn.execute(
                        select(BatchRecord).where(
                            BatchRecord.client == client, BatchRecord.request_id == request_id
                        )
                    )
                ).one()
                return Claimed(StoredBatch.from_row(winner), False, [])
            await conn.execute(insert(TaskRecord), [task_row(page, now) for page in pages])
            created = (
                await conn.execute(select(BatchRecord).where(BatchRecord.id == batch_id))
            ).one()
        return Claimed(StoredBatch.from_row(created), True, pages)

    async def get(self, client: str, batch_id: str) -> StoredBatch | None:
        """The client's live batch `batch_id`, or None; read with the others asked for
        meanwhile, by a read that begins after this call."""
        read = _Read(client, batch_id)
        await self._reads.submit(read)
        return read.found

    async def _read_together(self, reads: list[_Read]) -> None:
        ids = list({read.batch_id for read in reads})
        statement = select(BatchRecord).where(BatchRecord.id.in_(ids))
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            rows = {row.id: row for row in await conn.execute(statement)}
        now = utcnow()
        for read in reads:
            row = rows.get(read.batch_id)
            if (
                row is not None
                and row.client == read.client
                and row.enqueued_at + self._lifetime >= now
            ):
                read.found = StoredBatch.from_row(row)

    async def drop(self, batch_id: str) -> None:
        """Forget a batch none of whose pages reached the broker (their records are gone)."""
        async with store_errors(self._on_unavailable), self._engine.begin() as conn:
            await conn.execute(delete(TaskRecord).where(TaskRecord.batch_id == batch_id))
            await conn.execute(delete(BatchRecord).where(BatchRecord.id == batch_id))

    async def fail_unpublished(self, batch_id: str, pages: list[int], reason: str) -> None:
        """Count pages that never reached the broker (their records dropped) as failed; end the
        batch if its other pages have all finished meanwhile."""
        listed = ", ".join(map(str, pages))
        line = f"pages {listed}: never reached the broker ({reason})"
        async with store_errors(self._on_unavailable), self._engine.begin() as conn:
            batch = (
                await conn.execute(
                    update(BatchRecord)
                    .where(BatchRecord.id == batch_id)
                    .values(pages_failed=BatchRecord.pages_failed + len(pages))
                    .returning(*BatchRecord.__table__.columns)
                )
            ).one()
            changes: dict[str, Any] = {"error": f"{batch.error}; {line}" if batch.error else line}
            done = batch.pages_succeeded + batch.pages_failed + batch.pages_cancelled
            unfinished = (
                await conn.execute(
                    select(func.count()).where(
                        TaskRecord.batch_id == batch_id, TaskRecord.finished_at.is_(None)
                    )
                )
            ).scalar_one()
            if done == batch.pages_total and not unfinished:
                changes["finished_at"] = utcnow()
            await conn.execute(
                update(BatchRecord).where(BatchRecord.id == batch_id).values(changes)
            )

    async def cancel(self, client: str, batch_id: str) -> tuple[StoredBatch | None, list[str]]:
        """Cancel the batch: its unstarted pages end REVOKED now, its running ones stop at their
        next checkpoint, and no more are enqueued. The batch, and the ids of the pages ended
        here, whose queued messages the workers may drop (revoke): not those of running pages,
        whose message may be queued again (a retry, a redelivery) and, dropped, would leave the
        page STARTED for good; their worker ends them REVOKED at its checkpoint.

        The transaction runs again when the database gives it up for a concurrent one: an
        "until known" page enqueued by a worker's end just before the batch's row was locked
        here is not among the pages locked first, and a worker ending it at once would lock it
        before the batch, as this does after."""
        ended = await retry_contended(lambda: self._cancel(client, batch_id))
        return await self.get(client, batch_id), ended

    async def _cancel(self, client: str, batch_id: str) -> list[str]:
        now = utcnow()
        async with store_errors(self._on_unavailable), self._engine.begin() as conn:
            # Rows locked in the order a worker's ends lock them (`core.ledger.finish_many`):
            # the unfinished pages by id, then the batch. The batch first, a cancel and a
            # worker ending a page would each hold what the other waits for, and PostgreSQL
            # would end one of them: when the cancel's, the call answered UNAVAILABLE.
            await conn.execute(
                select(TaskRecord.id)
                .where(
                    TaskRecord.batch_id == batch_id,
                    TaskRecord.client == client,
                    TaskRecord.finished_at.is_(None),
                )
                .order_by(TaskRecord.id)
                .with_for_update()
            )
            asked = await conn.execute(
                update(BatchRecord)
                .where(
                    BatchRecord.id == batch_id,
                    BatchRecord.client == client,
                    BatchRecord.finished_at.is_(None),
                )
                .values(cancel_requested_at=func.coalesce(BatchRecord.cancel_requested_at, now))
            )
            ended: list[str] = []
            if asked.rowcount:
                pages = (
                    await conn.execute(
                        update(TaskRecord)
                        .where(TaskRecord.batch_id == batch_id, TaskRecord.finished_at.is_(None))
                        .values(cancel_requested_at=now)
                        .returning(TaskRecord.id, TaskRecord.started_at)
                    )
                ).all()
                unstarted = [page.id for page in pages if page.started_at is None]
                ended = await revoke_unstarted(conn, batch_id, unstarted, now=now)
                if not pages:  # nothing left to finish it (an "until known" batch between pages)
                    await conn.execute(
                        update(BatchRecord)
                        .where(BatchRecord.id == batch_id, BatchRecord.finished_at.is_(None))
                        .values(finished_at=now)
                    )
        return ended

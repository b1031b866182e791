"""core.ledger on a real database, SQLite (a file) and PostgreSQL: a task's final state written
once, its batch's counts moved in the same transaction, and the "until known" window.

Batches are made as the gateway makes them (`BatchRecords.create`), started as the worker
starts them (`worker.store.start_task`) and finished through `core.ledger.finish`, each finish
in a transaction of its own as the worker and the gateway run it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.db import BatchRecord, TaskRecord, create_engine, utcnow
from core.ledger import FINAL, Finished, Outcome, finish, finish_many, revoke_unstarted
from core.migrate import upgrade_to_head
from gateway.batches import BatchRecords, StoredBatch
from gateway.records import IssuedTask, TaskRecords
from worker.store import TaskStart, start_task, start_tasks

CLIENT = "alice"
LIFETIME = dt.timedelta(hours=1)
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url, pool_size=12)
    try:
        await upgrade_to_head(made)
        yield made
    finally:
        await made.dispose()


async def end(
    engine: AsyncEngine, task_id: str, outcome: Outcome, *, window: int = 0, now: Any = None
) -> Finished:
    """One finish in a transaction of its own, as a lone end in the worker's `finish_tasks`."""
    async with engine.begin() as conn:
        return await finish(conn, task_id, outcome, window=window, now=now)


async def end_together(
    engine: AsyncEngine, ends: list[tuple[str, Outcome]], *, window: int = 0, now: Any = None
) -> list[Finished]:
    """Ends in one transaction, as the worker's `finish_tasks` writes those that come together."""
    async with engine.begin() as conn:
        return await finish_many(conn, ends, window=window, now=now)


def success(created: int = 10, found: int = 10, updated: int = 0, skipped: int = 0) -> Outcome:
    return Outcome("SUCCESS", found=found, created=created, updated=updated, skipped=skipped)


async def batch_row(engine: AsyncEngine, batch_id: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(BatchRecord).where(BatchRecord.id == batch_id))).one()


async def task_rows(engine: AsyncEngine, batch_id: str) -> dict[int, Any]:
    """The batch's task records by page (a page recorded twice would fail here)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(TaskRecord).where(TaskRecord.batch_id == batch_id))).all()
    by_page = {row.page: row for row in rows}
    assert len(by_page) == len(rows), f"a page recorded twice: {sorted(r.page for r in rows)}"
    return by_page


async def make_batch(
    engine: AsyncEngine, first: int, last: int, *, until_known: bool = False, window: int = 4
) -> tuple[StoredBatch, dict[int, str]]:
    """A batch as UploadPages makes it; its first pages' task ids by page."""
    claimed = await BatchRecords(engine, LIFETIME).create(
        CLIENT, None, first, last, until_known=until_known, window=window
    )
    assert claimed.created
    return claimed.batch, {page.page: page.id for page in claimed.pages}


# --- a task is counted once ---------------------------------------------------------------------


async def test_finish_writes_a_task_once_and_counts_it_once(engine: AsyncEngine) -> None:
    batch, pages = await make_batch(engine, 1, 2)
    task_id = pages[1]
    first = await end(engine, task_id, success(created=7, found=9, updated=1, skipped=1), now=T0)
    assert first.counted and first.batch_id == batch.id and first.new_tasks == []
    # Later finishes (a redelivery, a cancel arriving late, the reconciler) change nothing.
    for later in (
        success(created=10),
        Outcome("FAILURE", error="too late"),
        Outcome("REVOKED", error="cancelled"),
    ):
        again = await end(engine, task_id, later, now=T0 + dt.timedelta(seconds=5))
        assert again == Finished(), later
    row = (await task_rows(engine, batch.id))[1]
    assert (row.status, row.found, row.created, row.updated, row.skipped, row.error) == (
        "SUCCESS",
        9,
        7,
        1,
        1,
        None,
    )
    assert row.finished_at == T0
    counted = await batch_row(engine, batch.id)
    assert (counted.pages_succeeded, counted.pages_failed, counted.pages_cancelled) == (1, 0, 0)
    assert (counted.found, counted.created, counted.updated, counted.skipped) == (9, 7, 1, 1)
    assert counted.finished_at is None  # page 2 is still to come


async def test_ten_concurrent_finishes_of_one_task_count_it_once(engine: AsyncEngine) -> None:
    batch, pages = await make_batch(engine, 1, 1)
    task_id = pages[1]
    # Each in its own transaction on its own connection, all at once, with different outcomes.
    outcomes = [
        success(created=n) if n % 3 == 0 else Outcome(FINAL[n % 3], error=f"finisher {n}")
        for n in range(10)
    ]
    results = await asyncio.gather(*(end(engine, task_id, outcome) for outcome in outcomes))
    winners = [n for n, result in enumerate(results) if result.counted]
    assert len(winners) == 1, results
    won = outcomes[winners[0]]
    row = (await task_rows(engine, batch.id))[1]
    assert (row.status, row.created, row.error) == (won.status, won.created, won.error)
    counted = await batch_row(engine, batch.id)
    counts = (counted.pages_succeeded, counted.pages_failed, counted.pages_cancelled)
    assert sum(counts) == 1
    assert counts[FINAL.index(won.status)] == 1
    assert counted.created == (won.created or 0)
    assert counted.finished_at is not None  # its only page ended


async def test_concurrent_finishes_of_every_page_count_each_once(engine: AsyncEngine) -> None:
    batch, pages = await make_batch(engine, 1, 10)
    # Every page finished twice, concurrently, the copies in a shuffled order.
    jobs = [(page, success(created=page, found=page + 1)) for page in pages] * 2
    random.Random(7).shuffle(jobs)
    results = await asyncio.gather(*(end(engine, pages[page], outcome) for page, outcome in jobs))
    assert sum(result.counted for result in results) == 10
    counted = await batch_row(engine, batch.id)
    assert counted.pages_succeeded == 10
    assert counted.created == sum(range(1, 11))
    assert counted.found == sum(range(2, 12))
    assert counted.finished_at is not None


async def test_a_lone_task_is_counted_for_no_batch(engine: AsyncEngine) -> None:
    task = IssuedTask.new(CLIENT, None, 3)
    await TaskRecords(engine, LIFETIME).add_many([task])
    assert await end(engine, task.id, success()) == Finished(counted=True)
    assert await end(engine, task.id, success()) == Finished()
    assert await end(engine, "00000000-0000-4000-8000-000000000000", success()) == Finished()
    with pytest.raises(ValueError, match="RETRY is not a final state"):
        await end(engine, task.id, Outcome("RETRY"))


# --- a batch's counts are its tasks' outcomes ---------------------------------------------------


async def test_a_batchs_counts_are_the_sum_of_its_tasks_outcomes(engine: AsyncEngine) -> None:
    batch, pages = await make_batch(engine, 5, 16)
    rng = random.Random(2026)
    order = list(pages)
    rng.shuffle(order)
    for step, page in enumerate(order):
        kind = rng.choice(FINAL)
        if kind == "SUCCESS":
            outcome = success(
                created=rng.randint(0, 10),
                found=rng.randint(0, 12),
                updated=rng.randint(0, 3),
                skipped=rng.randint(0, 2),
            )
        else:
            outcome = Outcome(kind, error=f"page {page} {kind.lower()}")
        now = T0 + dt.timedelta(seconds=step)
        assert (await end(engine, pages[page], outcome, now=now)).counted
        # Finished only once its last page has ended, at that finish's time.
        expected_finish = now if step == len(order) - 1 else None
        assert (await batch_row(engine, batch.id)).finished_at == expected_finish

    tasks = (await task_rows(engine, batch.id)).values()
    counted = await batch_row(engine, batch.id)
    by_status = {status: [t for t in tasks if t.status == status] for status in FINAL}
    assert counted.pages_succeeded == len(by_status["SUCCESS"])
    assert counted.pages_failed == len(by_status["FAILURE"])
    assert counted.pages_cancelled == len(by_status["REVOKED"])
    assert counted.pages_total == 12
    for column in ("found", "created", "updated", "skipped"):
        assert getattr(counted, column) == sum(getattr(t, column) or 0 for t in tasks), column
    # The batch's error names each failed page with its error, in the order they failed.
    failed = sorted(by_status["FAILURE"], key=lambda t: t.finished_at)
    assert failed, "the seed gives failures"
    assert counted.error == "; ".join(f"page {t.page}: {t.error}" for t in failed)
    assert StoredBatch.from_row(counted).status == "FAILURE"


async def test_a_batch_all_of_whose_pages_succeed_is_success(engine: AsyncEngine) -> None:
    batch, pages = await make_batch(engine, 1, 3)
    for page, task_id in pages.items():
        await end(engine, task_id, success(created=page))
    counted = StoredBatch.from_row(await batch_row(engine, batch.id))
    assert (counted.status, counted.created, counted.error) == ("SUCCESS", 6, None)


# --- "until known": the window ------------------------------------------------------------------


@dataclass
class Model:
    """The window's rule, spelled out: what the ledger must enqueue after each finish."""

    first: int
    last: int
    window: int
    enqueued: list[int] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)
    stop_page: int | None = None

    def __post_init__(self) -> None:
        self.enqueued = list(range(self.first, min(self.last, self.first + self.window - 1) + 1))

    @property
    def next_page(self) -> int:
        return self.enqueued[-1] + 1

    def finish(self, page: int, created_nothing: bool) -> list[int]:
        self.finished.add(page)
        if created_nothing:
            self.stop_page = page if self.stop_page is None else min(self.stop_page, page)
        if self.stop_page is not None:
            return []
        unfinished = [p for p in self.enqueued if p not in self.finished]
        lowest = min(unfinished) if unfinished else self.next_page
        new = list(range(self.next_page, min(self.last, lowest + self.window - 1) + 1))
        self.enqueued += new
        return new


async def test_until_known_enqueues_a_window_ahead_and_stops_at_the_first_known_page(
    engine: AsyncEngine,
) -> None:
    batch, pages = await make_batch(engine, 1, 20, until_known=True, window=4)
    assert sorted(pages) == [1, 2, 3, 4]
    assert (batch.next_page, batch.pages_total) == (5, 4)

    async def done(page: int, created: int) -> list[int]:
        finished = await end(engine, pages[page], success(created=created), window=4)
        for new in finished.new_tasks:
            assert new.batch_id == batch.id and new.client == CLIENT
            pages[new.page] = new.id
        return [new.page for new in finished.new_tasks]

    # Page 2 ends first: page 1 is still the lowest unfinished, so the window (1-4) is full.
    assert await done(2, 10) == []
    # Page 1 ends: the lowest unfinished is 3, so pages up to 3 + 4 - 1 = 6 may run.
    assert await done(1, 10) == [5, 6]
    assert await done(4, 10) == []  # the lowest unfinished is still 3
    # Page 5 created nothing: it is where the batch stops; nothing more is enqueued.
    assert await done(5, 0) == []
    assert (await batch_row(engine, batch.id)).stop_page == 5
    # Page 3, below it, created nothing too: the stop is the lowest such page.
    assert await done(3, 0) == []
    assert (await batch_row(engine, batch.id)).stop_page == 3
    assert (await batch_row(engine, batch.id)).finished_at is None  # page 6 still runs
    assert await done(6, 10) == []
    counted = await batch_row(engine, batch.id)
    assert (counted.stop_page, counted.pages_total, counted.next_page) == (3, 6, 7)
    assert counted.pages_succeeded == 6 and counted.finished_at is not None
    assert sorted(await task_rows(engine, batch.id)) == [1, 2, 3, 4, 5, 6]
    assert StoredBatch.from_row(counted).status == "SUCCESS"


async def test_until_known_runs_to_last_page_when_every_page_is_new(engine: AsyncEngine) -> None:
    batch, pages = await make_batch(engine, 3, 9, until_known=True, window=2)
    assert sorted(pages) == [3, 4]
    while True:
        open_pages = sorted(set(pages) - set(await finished_pages(engine, batch.id)))
        if not open_pages:
            break
        result = await end(engine, pages[open_pages[0]], success(created=1), window=2)
        pages.update({new.page: new.id for new in result.new_tasks})
    counted = await batch_row(engine, batch.id)
    assert sorted(pages) == list(range(3, 10))
    assert (counted.stop_page, counted.pages_total, counted.pages_succeeded) == (None, 7, 7)
    assert counted.finished_at is not None


async def finished_pages(engine: AsyncEngine, batch_id: str) -> list[int]:
    return [p for p, row in (await task_rows(engine, batch_id)).items() if row.finished_at]


@pytest.mark.parametrize("seed", range(6))
async def test_until_known_follows_the_window_rule_in_any_order(
    engine: AsyncEngine, seed: int
) -> None:
    rng = random.Random(seed)
    window = rng.randint(1, 5)
    first = rng.randint(1, 5)
    last = first + rng.randint(0, 25)
    batch, pages = await make_batch(engine, first, last, until_known=True, window=window)
    model = Model(first, last, window)
    assert sorted(pages) == model.enqueued
    while open_pages := [p for p in model.enqueued if p not in model.finished]:
        page = rng.choice(open_pages)
        created = 0 if rng.random() < 0.15 else rng.randint(1, 10)
        if rng.random() < 0.1:  # a failed page does not stop the batch
            result = await end(engine, pages[page], Outcome("FAILURE", error="x"), window=window)
            expected = model.finish(page, created_nothing=False)
        else:
            result = await end(engine, pages[page], success(created=created), window=window)
            expected = model.finish(page, created_nothing=created == 0)
        assert [new.page for new in result.new_tasks] == expected, (seed, page)
        pages.update({new.page: new.id for new in result.new_tasks})
    counted = await batch_row(engine, batch.id)
    assert sorted(await task_rows(engine, batch.id)) == model.enqueued
    assert counted.stop_page == model.stop_page
    assert counted.pages_total == len(model.enqueued)
    assert counted.finished_at is not None


async def test_concurrent_finishes_never_enqueue_a_page_twice(engine: AsyncEngine) -> None:
    batch, pages = await make_batch(engine, 1, 30, until_known=True, window=4)
    results = await asyncio.gather(
        *(end(engine, task_id, success(created=10), window=4) for task_id in pages.values())
    )
    new = [task.page for result in results for task in result.new_tasks]
    # The last of the four to commit saw the other three finished: up to 5 + 4 - 1.
    assert sorted(new) == [5, 6, 7, 8]
    assert sorted(await task_rows(engine, batch.id)) == list(range(1, 9))
    counted = await batch_row(engine, batch.id)
    assert (counted.next_page, counted.pages_total, counted.finished_at) == (9, 8, None)


async def test_nothing_is_enqueued_after_a_cancel(engine: AsyncEngine) -> None:
    batch, pages = await make_batch(engine, 1, 20, until_known=True, window=3)
    for page in (1, 2):  # running when the cancel comes
        start = await start_task(engine, pages[page])
        assert start.batch_id == batch.id and not start.cancelled
    cancelled, revocable = await BatchRecords(engine, LIFETIME).cancel(CLIENT, batch.id)
    assert cancelled is not None and cancelled.status == "REVOKED"
    # Only the page the cancel ended may have its message dropped: a running page's message may
    # be queued again (a retry), and its worker ends it at the checkpoint.
    assert revocable == [pages[3]]
    # Page 3 had not started: REVOKED at once, without enqueuing anything.
    rows = await task_rows(engine, batch.id)
    assert (rows[3].status, rows[3].error) == ("REVOKED", "cancelled")
    assert cancelled.pages_cancelled == 1 and cancelled.finished_at is None
    # Page 1 stored before it saw the cancel: counted, but no page is added for it.
    assert (await end(engine, pages[1], success(created=10), window=3)).new_tasks == []
    assert (await batch_row(engine, batch.id)).finished_at is None
    # Page 2 stopped at its checkpoint: the last page to end, so the batch has finished.
    assert (await end(engine, pages[2], Outcome("REVOKED", error="cancelled"), window=3)).counted
    counted = await batch_row(engine, batch.id)
    assert (counted.pages_total, counted.pages_succeeded, counted.pages_cancelled) == (3, 1, 2)
    assert counted.finished_at is not None and counted.created == 10
    assert sorted(await task_rows(engine, batch.id)) == [1, 2, 3]
    # A second cancel finds the batch finished: nothing to revoke, nothing changes.
    again, revocable = await BatchRecords(engine, LIFETIME).cancel(CLIENT, batch.id)
    assert revocable == [] and again is not None and again.finished_at == counted.finished_at


async def test_cancelling_a_batch_none_of_whose_pages_started_finishes_it(
    engine: AsyncEngine,
) -> None:
    batch, pages = await make_batch(engine, 1, 5)
    cancelled, running = await BatchRecords(engine, LIFETIME).cancel(CLIENT, batch.id)
    assert cancelled is not None
    assert (cancelled.status, cancelled.pages_cancelled, cancelled.pages_total) == ("REVOKED", 5, 5)
    assert cancelled.finished_at is not None
    assert sorted(running) == sorted(pages.values())  # told to the workers, as a hint
    # Another client cannot cancel it, nor see it.
    assert await BatchRecords(engine, LIFETIME).cancel("mallory", batch.id) == (None, [])


async def test_pages_revoked_together_count_once_beside_pages_ending_on_their_own(
    engine: AsyncEngine,
) -> None:
    """revoke_unstarted ends many queued pages in one statement: a page that ended meanwhile
    (its worker was faster) is neither ended again nor counted twice, and the batch's counts
    are the sum of its pages' own outcomes."""
    batch, pages = await make_batch(engine, 1, 300)
    async with engine.begin() as conn:
        await conn.execute(
            update(BatchRecord).where(BatchRecord.id == batch.id).values(cancel_requested_at=T0)
        )
    assert (await end(engine, pages[7], success(created=3))).counted
    async with engine.begin() as conn:
        ended = await revoke_unstarted(conn, batch.id, list(pages.values()), now=T0)
    assert sorted(ended) == sorted(task for page, task in pages.items() if page != 7)
    async with engine.begin() as conn:
        assert await revoke_unstarted(conn, batch.id, list(pages.values()), now=T0) == []
    rows = await task_rows(engine, batch.id)
    assert {row.status for page, row in rows.items() if page != 7} == {"REVOKED"}
    counted = await batch_row(engine, batch.id)
    assert (counted.pages_succeeded, counted.pages_cancelled, counted.created) == (1, 299, 3)
    assert counted.finished_at is not None


async def test_a_batch_finishes_no_earlier_than_its_last_page(engine: AsyncEngine) -> None:
    """A finish takes its time before it waits for the batch's row: one that waited behind a
    cancel must not date the batch's end before the pages that cancel ended."""
    batch, pages = await make_batch(engine, 1, 3)
    await start_task(engine, pages[1])  # running; pages 2 and 3 have not started
    async with engine.connect() as canceller:
        await canceller.begin()
        # What BatchRecords.cancel does first: the batch's row, locked until the commit.
        await canceller.execute(
            update(BatchRecord)
            .where(BatchRecord.id == batch.id)
            .values(cancel_requested_at=utcnow())
        )
        # Page 1 ends meanwhile: it dates its end now, then waits for the batch's row.
        worker = asyncio.create_task(end(engine, pages[1], success()))
        await asyncio.sleep(0.3)
        assert not worker.done()
        for page in (2, 3):  # the cancel ends the unstarted pages, later
            await finish(canceller, pages[page], Outcome("REVOKED", error="cancelled"), window=0)
        await canceller.commit()
    assert (await worker).counted
    rows = (await task_rows(engine, batch.id)).values()
    counted = await batch_row(engine, batch.id)
    assert (counted.pages_succeeded, counted.pages_cancelled) == (1, 2)
    assert counted.finished_at is not None
    assert counted.finished_at >= max(row.finished_at for row in rows)


async def test_a_worker_taking_a_cancelled_page_starts_neither_it_nor_its_batch(
    engine: AsyncEngine,
) -> None:
    batch, pages = await make_batch(engine, 1, 2)
    await BatchRecords(engine, LIFETIME).cancel(CLIENT, batch.id)
    # A worker takes the message later and drops it: it never ran, so it never started.
    start = await start_task(engine, pages[1])
    assert (start.cancelled, start.finished, start.batch_id) == (True, True, batch.id)
    row = (await task_rows(engine, batch.id))[1]
    assert (row.status, row.started_at, row.deliveries) == ("REVOKED", None, 1)
    counted = await batch_row(engine, batch.id)
    assert counted.started_at is None and counted.finished_at is not None


async def test_a_batch_started_when_its_first_page_did_and_later_starts_keep_that_time(
    engine: AsyncEngine,
) -> None:
    batch, pages = await make_batch(engine, 1, 3)
    assert (await batch_row(engine, batch.id)).started_at is None

    await start_task(engine, pages[2], now=T0)
    await start_task(engine, pages[1], now=T0 + dt.timedelta(seconds=5))
    await start_task(engine, pages[2], now=T0 + dt.timedelta(seconds=9))  # a redelivery

    assert (await batch_row(engine, batch.id)).started_at == T0
    rows = await task_rows(engine, batch.id)
    assert (rows[1].started_at, rows[2].started_at, rows[3].started_at) == (
        T0 + dt.timedelta(seconds=5),
        T0,
        None,
    )


async def test_starts_written_together_count_each_task_once_and_leave_out_the_unknown(
    engine: AsyncEngine,
) -> None:
    batch, pages = await make_batch(engine, 1, 4)
    await BatchRecords(engine, LIFETIME).cancel(CLIENT, batch.id)  # every page REVOKED unstarted
    lone, other_batch = await make_batch(engine, 10, 12)
    ids = [*other_batch.values(), pages[1], "no-such-task"]

    started = await start_tasks(engine, ids, now=T0)

    assert set(started) == {*other_batch.values(), pages[1]}
    for task_id in other_batch.values():
        # The group's first start of the batch: each says it started the batch.
        assert started[task_id] == TaskStart(1, batch_id=lone.id, batch_started=True)
    assert started[pages[1]] == TaskStart(1, cancelled=True, finished=True, batch_id=batch.id)
    rows = await task_rows(engine, lone.id)
    assert {(row.status, row.started_at, row.deliveries) for row in rows.values()} == {
        ("STARTED", T0, 1)
    }
    assert (await batch_row(engine, lone.id)).started_at == T0
    assert (await batch_row(engine, batch.id)).started_at is None
    with pytest.raises(ValueError, match="counted once"):
        await start_tasks(engine, [pages[2], pages[2]])


# --- ends written together ----------------------------------------------------------------------


async def test_ends_written_together_count_as_the_same_ends_one_by_one(engine: AsyncEngine) -> None:
    rng = random.Random(31)
    outcomes = {
        page: success(created=rng.randint(0, 9), found=rng.randint(0, 12), updated=1)
        if rng.random() < 0.6
        else Outcome(rng.choice(("FAILURE", "REVOKED")), error=f"page {page} went wrong")
        for page in range(1, 9)
    }
    order = list(outcomes)
    rng.shuffle(order)
    apart, apart_pages = await make_batch(engine, 1, 8)
    for page in order:
        await end(engine, apart_pages[page], outcomes[page], now=T0)
    together, together_pages = await make_batch(engine, 1, 8)
    lone = IssuedTask.new(CLIENT, None, 3)
    await TaskRecords(engine, LIFETIME).add_many([lone])
    ends = [(together_pages[page], outcomes[page]) for page in order]
    # The lone task, a page named twice (a copy of its task), a task nobody issued.
    ends += [(lone.id, success()), (together_pages[order[0]], success(created=99))]
    ends += [("00000000-0000-4000-8000-000000000000", success())]
    batch_updates: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE BATCHES"):
            batch_updates.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        results = await end_together(engine, ends, now=T0)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)

    # Eight pages of one batch: its counts in one UPDATE, its errors and end in another.
    assert len(batch_updates) == 2, batch_updates

    assert [result.counted for result in results] == [True] * 9 + [False, False]
    assert [result.batch_id for result in results[:8]] == [together.id] * 8
    assert results[8] == Finished(counted=True, record=results[8].record)
    for result, (task_id, outcome) in zip(results[:9], ends, strict=False):
        assert result.record is not None and result.record["id"] == task_id
        assert result.record["status"] == outcome.status
    columns = [
        *("pages_succeeded", "pages_failed", "pages_cancelled", "pages_total", "stop_page"),
        *("found", "created", "updated", "skipped", "finished_at"),
    ]
    one_by_one, grouped = await batch_row(engine, apart.id), await batch_row(engine, together.id)
    assert [getattr(grouped, c) for c in columns] == [getattr(one_by_one, c) for c in columns]
    assert grouped.finished_at == T0
    # The same failures named, in page order rather than the order they came in.
    assert sorted((grouped.error or "").split("; ")) == sorted((one_by_one.error or "").split("; "))
    fields = ("status", "error", "found", "created", "updated", "skipped", "finished_at")
    apart_rows, together_rows = (
        await task_rows(engine, apart.id),
        await task_rows(engine, together.id),
    )
    for page in outcomes:
        assert [getattr(together_rows[page], f) for f in fields] == [
            getattr(apart_rows[page], f) for f in fields
        ], page


async def test_ends_together_of_an_until_known_batch_enqueue_its_window_once(
    engine: AsyncEngine,
) -> None:
    batch, pages = await make_batch(engine, 1, 30, until_known=True, window=4)
    ends = [(pages[page], success(created=10)) for page in (3, 1, 4, 2)]

    results = await end_together(engine, ends, window=4)

    # The window moved once, after all four: up to the lowest unfinished page (5) + 4 - 1.
    assert sorted(task.page for result in results for task in result.new_tasks) == [5, 6, 7, 8]
    assert sorted(await task_rows(engine, batch.id)) == list(range(1, 9))
    counted = await batch_row(engine, batch.id)
    assert (counted.pages_succeeded, counted.next_page, counted.pages_total) == (4, 9, 8)


async def test_groups_of_ends_of_the_same_batches_never_deadlock(engine: AsyncEngine) -> None:
    # Two workers' groups, each ending a page of batch A and one of batch B, named in opposite
    # orders: locked in the order named, each would hold one batch's row and wait for the
    # other's (PostgreSQL then aborts one with a deadlock).
    first, first_pages = await make_batch(engine, 1, 20)
    second, second_pages = await make_batch(engine, 1, 20)
    for page in range(1, 21, 2):
        one = [(first_pages[page], success()), (second_pages[page], success())]
        other = [(second_pages[page + 1], success()), (first_pages[page + 1], success())]
        results = await asyncio.gather(end_together(engine, one), end_together(engine, other))
        assert all(r.counted for group in results for r in group)
    for batch in (first, second):
        counted = await batch_row(engine, batch.id)
        assert (counted.pages_succeeded, counted.created) == (20, 200)
        assert counted.finished_at is not None


async def until_a_statement_waits_for_a_lock(engine: AsyncEngine) -> None:
    """Until another session of this database waits for a row lock (bounded)."""
    deadline = asyncio.get_running_loop().time() + 30
    async with engine.connect() as conn:
        while True:
            waiting = (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
                    )
                )
            ).scalar_one()
            if waiting:
                return
            assert asyncio.get_running_loop().time() < deadline, "no statement waited for a lock"
            await asyncio.sleep(0.01)


async def test_a_cancel_and_a_worker_s_end_of_its_batch_never_deadlock(
    engine: AsyncEngine,
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("row locks are PostgreSQL's: SQLite writes one transaction at a time")
    batch, pages = await make_batch(engine, 1, 4)
    await start_task(engine, pages[2])
    async with engine.connect() as worker:
        transaction = await worker.begin()
        # A worker's group of ends has locked its page's row, not yet its batch's.
        await worker.execute(
            select(TaskRecord.id).where(TaskRecord.id == pages[2]).with_for_update()
        )
        cancel = asyncio.ensure_future(BatchRecords(engine, LIFETIME).cancel(CLIENT, batch.id))
        await until_a_statement_waits_for_a_lock(engine)
        # The batch's row locked before its pages', the cancel would hold it now, and this
        # count would wait for it while the cancel waits for the page: PostgreSQL ends one.
        (ended,) = await finish_many(worker, [(pages[2], success())], window=0)
        await transaction.commit()
    cancelled, revoked = await cancel

    assert ended.counted
    assert cancelled is not None and cancelled.status == "REVOKED"
    assert sorted(revoked) == sorted(pages[page] for page in (1, 3, 4))
    counted = await batch_row(engine, batch.id)
    assert (counted.pages_succeeded, counted.pages_cancelled) == (1, 3)
    assert counted.finished_at is not None


async def test_a_cancel_the_database_gives_up_for_a_deadlock_runs_again(
    engine: AsyncEngine, database_url: str
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("row locks are PostgreSQL's: SQLite writes one transaction at a time")
    batch, pages = await make_batch(engine, 1, 2)
    await start_task(engine, pages[2])  # running: a cancel only marks it
    reported_down: list[None] = []

    async def down() -> None:
        reported_down.append(None)

    # The cancel's sessions check for a deadlock after 5 s of waiting (a setting of the
    # session, from its start), this test's other one after a minute: PostgreSQL gives up the
    # cancel's transaction, not the other, however slowly the other comes to wait on a loaded
    # machine (within 5 s).
    cancelling = create_async_engine(
        database_url, connect_args={"server_settings": {"deadlock_timeout": "5s"}}
    )

    records = BatchRecords(cancelling, LIFETIME, on_unavailable=down)
    async with engine.connect() as other:
        transaction = await other.begin()
        await other.execute(text("SET LOCAL deadlock_timeout = '60s'"))
        # The batch's row held, as a worker's end holds it while it enqueues an "until known"
        # page the cancel did not lock first.
        await other.execute(
            select(BatchRecord.id).where(BatchRecord.id == batch.id).with_for_update()
        )
        cancel = asyncio.ensure_future(records.cancel(CLIENT, batch.id))
        await until_a_statement_waits_for_a_lock(engine)  # it holds the pages, waits for the batch
        await other.execute(
            select(TaskRecord.id).where(TaskRecord.id == pages[2]).with_for_update()
        )
        await transaction.commit()
    try:
        cancelled, revoked = await cancel
    finally:
        await cancelling.dispose()

    assert cancelled is not None and cancelled.cancel_requested_at is not None
    assert revoked == [pages[1]]
    assert reported_down == []  # a deadlock is not an outage: the gateway stays SERVING
    rows = await task_rows(engine, batch.id)
    assert (rows[1].status, rows[2].status) == ("REVOKED", "STARTED")
    assert rows[2].cancel_requested_at is not None


async def test_tasks_judged_lost_end_failure_and_count_for_their_batches_once(
    engine: AsyncEngine,
) -> None:
    first, first_pages = await make_batch(engine, 1, 3)
    second, second_pages = await make_batch(engine, 1, 2)
    lone = IssuedTask.new(CLIENT, None, 9)
    records = TaskRecords(engine, LIFETIME)
    await records.add_many([lone])
    await start_task(engine, first_pages[3])  # a worker has it: not lost
    reasons = {
        second_pages[1]: "the broker lost it",
        first_pages[2]: "the broker lost it",
        lone.id: "the broker lost it",
        first_pages[3]: "the broker lost it",
    }

    await records.mark_lost(reasons)
    await records.mark_lost(reasons)  # judged again: nothing more

    rows = await task_rows(engine, first.id)
    assert (rows[2].status, rows[2].lost_reason, rows[2].error) == (
        "FAILURE",
        *["the broker lost it"] * 2,
    )
    assert (rows[3].status, rows[3].lost_reason) == ("STARTED", None)
    assert (await task_rows(engine, second.id))[1].status == "FAILURE"
    for batch, page in ((first, 2), (second, 1)):
        counted = await batch_row(engine, batch.id)
        assert (counted.pages_failed, counted.error) == (1, f"page {page}: the broker lost it")

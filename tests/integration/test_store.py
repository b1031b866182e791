"""store_projects and record_start on a real database: SQLite (a file) and PostgreSQL.

Every test runs on both; each gets a fresh database migrated by core.migrate, as a worker's
would be at start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import MAX_URL_LENGTH, Project, TaskRecord, create_engine, utcnow
from core.settings import Settings
from tests.support.databases import engine_for
from tests.support.projects import project_item, project_items
from worker.errors import RetryableError
from worker.parse import ProjectItem
from worker.store import StoreCounts, record_start, store_projects

BATCH = 500


async def stored(engine: AsyncEngine) -> dict[str, Any]:
    """Every projects row, by link."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(Project.__table__))).all()
    return {row.url: row for row in rows}


def fields(row: Any) -> ProjectItem:
    return ProjectItem(row.url, row.title, row.description, row.is_active, row.start_date)


def changed(item: ProjectItem, **values: Any) -> ProjectItem:
    return dataclasses.replace(item, **values)


# --- creating and refreshing --------------------------------------------------------------------


async def test_first_store_creates_every_item(database_url: str) -> None:
    items = project_items(10)

    async with engine_for(database_url) as engine:
        before = utcnow()
        counts = await store_projects(engine, items, BATCH)
        rows = await stored(engine)

    assert counts == StoreCounts(created=10, updated=0, unstorable=0)
    assert sorted(map(fields, rows.values()), key=lambda i: i.url) == sorted(
        items, key=lambda i: i.url
    )
    for row in rows.values():
        assert row.first_seen_at == row.last_seen_at == row.updated_at
        assert row.first_seen_at >= before
        # Read back aware and in UTC on both databases (asyncpg's own decoding on PostgreSQL).
        assert row.first_seen_at.utcoffset() == dt.timedelta(0), row.first_seen_at


async def test_same_items_again_create_and_update_nothing_but_are_seen(database_url: str) -> None:
    items = project_items(10)

    async with engine_for(database_url) as engine:
        await store_projects(engine, items, BATCH)
        first = await stored(engine)
        counts = await store_projects(engine, items, BATCH)
        second = await stored(engine)

    assert counts == StoreCounts(created=0, updated=0, unstorable=0)
    assert second.keys() == first.keys()
    for url, row in second.items():
        assert fields(row) == fields(first[url])
        assert row.first_seen_at == first[url].first_seen_at
        assert row.updated_at == first[url].updated_at
        assert row.last_seen_at > first[url].last_seen_at


async def test_changed_items_are_counted_exactly_and_take_their_new_values(
    database_url: str,
) -> None:
    items = project_items(10)  # even numbers have a start date, odd ones none
    assert items[4].start_date is not None and items[5].start_date is None
    new_items = list(items)
    new_items[0] = changed(items[0], title="A new title")
    new_items[1] = changed(items[1], description="")
    new_items[2] = changed(items[2], is_active=not items[2].is_active)
    new_items[4] = changed(items[4], start_date=None)
    new_items[5] = changed(items[5], start_date=dt.date(2030, 5, 17))
    new_items[6] = changed(items[6], start_date=dt.date(1999, 12, 31))
    new_items.append(project_item(10))  # a new one beside them
    changed_urls = {items[n].url for n in (0, 1, 2, 4, 5, 6)}

    async with engine_for(database_url) as engine:
        await store_projects(engine, items, BATCH)
        first = await stored(engine)
        counts = await store_projects(engine, new_items, BATCH)
        second = await stored(engine)

    assert counts == StoreCounts(created=1, updated=6, unstorable=0)
    assert {url: fields(row) for url, row in second.items()} == {i.url: i for i in new_items}
    for url, before in first.items():
        row = second[url]
        assert row.first_seen_at == before.first_seen_at
        assert row.last_seen_at > before.last_seen_at
        if url in changed_urls:
            assert row.updated_at == row.last_seen_at
        else:
            assert row.updated_at == before.updated_at


async def test_link_listed_twice_is_stored_once_and_the_last_listing_wins(
    database_url: str,
) -> None:
    first_listing = project_item(1, title="First listing")
    last_listing = project_item(1, title="Last listing", is_active=False)
    items = [first_listing, project_item(2), last_listing]

    async with engine_for(database_url) as engine:
        created = await store_projects(engine, items, BATCH)
        rows = await stored(engine)
        again = await store_projects(engine, [last_listing, first_listing], BATCH)
        rows_again = await stored(engine)

    assert created == StoreCounts(created=2, updated=0, unstorable=0)
    assert fields(rows[last_listing.url]) == last_listing
    assert again == StoreCounts(created=0, updated=1, unstorable=0)
    assert fields(rows_again[first_listing.url]) == first_listing


async def test_batches_smaller_than_the_items_count_the_same(database_url: str) -> None:
    items = project_items(10)
    new_items = [changed(item, title=f"{item.title}, renamed") for item in items[:4]]
    new_items += items[4:] + project_items(2, start=10)

    async with engine_for(database_url) as engine:
        first = await store_projects(engine, items, batch_size=3)
        second = await store_projects(engine, new_items, batch_size=3)
        third = await store_projects(engine, new_items, batch_size=3)
        rows = await stored(engine)

    assert first == StoreCounts(created=10, updated=0, unstorable=0)
    assert second == StoreCounts(created=2, updated=4, unstorable=0)
    assert third == StoreCounts(created=0, updated=0, unstorable=0)
    assert {url: fields(row) for url, row in rows.items()} == {i.url: i for i in new_items}


async def test_the_largest_batch_is_stored_as_one_statement_under_one_revision(
    database_url: str,
) -> None:
    """SQLAlchemy splits a many-row INSERT into statements of 1,000 rows by default; each would
    take a revision of its own (on PostgreSQL the upsert takes it) and commit apart."""
    largest = Settings.model_fields["upsert_batch_size"].metadata
    size = next(rule.le for rule in largest if getattr(rule, "le", None) is not None)
    items = project_items(size)

    async with engine_for(database_url) as engine:
        counts = await store_projects(engine, items, batch_size=size)
        rows = await stored(engine)

    assert counts.created == size
    assert {row.revision for row in rows.values()} == {counts.revision}
    assert counts.revision > 0


async def test_over_long_link_is_not_stored_and_counted_unstorable(database_url: str) -> None:
    prefix = "https://listing.test/"
    longest = project_item(1, prefix=prefix + "a" * (MAX_URL_LENGTH - len(prefix) - 1))
    too_long = project_item(1, prefix=prefix + "b" * (MAX_URL_LENGTH - len(prefix)))
    assert (len(longest.url), len(too_long.url)) == (MAX_URL_LENGTH, MAX_URL_LENGTH + 1)
    items = [project_item(2), too_long, longest, too_long]

    async with engine_for(database_url) as engine:
        counts = await store_projects(engine, items, BATCH)
        rows = await stored(engine)

    assert counts == StoreCounts(created=2, updated=0, unstorable=1)
    assert set(rows) == {project_item(2).url, longest.url}


@pytest.mark.parametrize(
    "database_url",
    [
        "sqlite",
        pytest.param(
            "postgresql",
            marks=[pytest.mark.postgres],
        ),
    ],
    indirect=True,
)
async def test_link_within_the_length_limit_but_not_ascii_does_not_fail_the_batch(
    database_url: str,
) -> None:
    # Cyrillic letters in random order: a repeating pattern would compress under the limit.
    rng = random.Random(2048)
    letters = [chr(0x430 + rng.randrange(32)) for _ in range(MAX_URL_LENGTH)]
    prefix = "https://listing.test/"
    wide = project_item(1, prefix=prefix + "".join(letters)[: MAX_URL_LENGTH - len(prefix) - 1])
    assert len(wide.url) == MAX_URL_LENGTH
    plain = project_item(2)

    async with engine_for(database_url) as engine:
        counts = await store_projects(engine, [wide, plain], BATCH)
        rows = await stored(engine)

    # Stored, or at least counted as unstorable; the other item must not suffer for it.
    assert plain.url in rows
    assert counts.created + counts.unstorable == 2


# --- concurrency --------------------------------------------------------------------------------


def _overlapping_sets(prefix: str) -> list[list[ProjectItem]]:
    """Four listings of 40 links that overlap: [0,20), [10,30), [20,40) and all 40 reversed."""
    everything = project_items(40, prefix=prefix)
    return [everything[0:20], everything[10:30], everything[20:40], everything[::-1]]


async def _count_rows(engine: AsyncEngine, prefix: str) -> tuple[int, int]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(func.count(), func.count(Project.url.distinct())).where(
                Project.url.startswith(prefix)
            )
        )
        total, distinct = result.one()
    return int(total), int(distinct)


def _assert_each_link_created_once(counts: Sequence[StoreCounts], rows: tuple[int, int]) -> None:
    assert rows == (40, 40)
    assert sum(c.created for c in counts) == 40
    # The listings agree on every field, so no call changed what another created.
    assert sum(c.updated for c in counts) == 0
    assert sum(c.unstorable for c in counts) == 0


async def test_concurrent_stores_in_one_process_create_each_link_once(database_url: str) -> None:
    async with engine_for(database_url) as engine:
        for round_ in range(3):
            prefix = f"https://listing.test/r{round_}/"
            counts = await asyncio.gather(
                *(store_projects(engine, s, batch_size=7) for s in _overlapping_sets(prefix))
            )
            _assert_each_link_created_once(counts, await _count_rows(engine, prefix))


async def test_more_concurrent_stores_than_connections_take_turns_and_all_succeed(
    database_url: str,
) -> None:
    # A worker process has WORKER_DB_CONNECTIONS connections for WORKER_CONCURRENCY tasks:
    # the tasks beyond the pool wait for a connection instead of failing or opening more.
    pages = [project_items(20, start=20 * page) for page in range(8)]

    async with engine_for(database_url):
        pass  # migrated
    engine = create_engine(database_url, pool_size=1, max_overflow=0, pre_ping=False)
    try:
        counts = await asyncio.gather(
            *(store_projects(engine, items, BATCH) for items in pages),
            *(record_start(engine, str(uuid.uuid4())) for _ in range(8)),
        )
        assert counts[:8] == [StoreCounts(created=20)] * 8
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
        async with engine.connect() as conn:
            rows = (await conn.execute(select(func.count()).select_from(Project))).scalar()
        assert rows == 160
    finally:
        await engine.dispose()


async def test_concurrent_stores_from_two_engines_create_each_link_once(database_url: str) -> None:
    # Two engines, two connection pools: as two worker processes would write.
    async with (
        engine_for(database_url) as first,
        engine_for(database_url, migrate=False) as second,
    ):
        for round_ in range(3):
            prefix = f"https://listing.test/r{round_}/"
            sets = _overlapping_sets(prefix)
            counts = await asyncio.gather(
                *(
                    store_projects(first if n % 2 == 0 else second, s, batch_size=7)
                    for n, s in enumerate(sets)
                )
            )
            _assert_each_link_created_once(counts, await _count_rows(first, prefix))


# --- task starts --------------------------------------------------------------------------------


async def _insert_task(engine: AsyncEngine, task_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(TaskRecord).values(
                id=task_id,
                client="tester",
                request_id=None,
                page=3,
                enqueued_at=utcnow(),
                started_at=None,
                deliveries=0,
                lost_reason=None,
            )
        )


async def _task_row(engine: AsyncEngine, task_id: str) -> Any:
    async with engine.connect() as conn:
        result = await conn.execute(select(TaskRecord.__table__).where(TaskRecord.id == task_id))
        return result.one()


async def test_record_start_counts_deliveries_and_keeps_the_first_start(database_url: str) -> None:
    task_id = str(uuid.uuid4())
    first_start = dt.datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=dt.UTC)
    second_start = first_start + dt.timedelta(minutes=5)

    async with engine_for(database_url) as engine:
        await _insert_task(engine, task_id)
        first = await record_start(engine, task_id, now=first_start)
        after_first = await _task_row(engine, task_id)
        second = await record_start(engine, task_id, now=second_start)
        after_second = await _task_row(engine, task_id)

    assert (first, second) == (1, 2)
    assert (after_first.deliveries, after_first.started_at) == (1, first_start)
    assert (after_second.deliveries, after_second.started_at) == (2, first_start)


async def test_record_start_without_a_time_uses_now(database_url: str) -> None:
    task_id = str(uuid.uuid4())

    async with engine_for(database_url) as engine:
        await _insert_task(engine, task_id)
        before = utcnow()
        assert await record_start(engine, task_id) == 1
        after = utcnow()
        row = await _task_row(engine, task_id)

    assert before <= row.started_at <= after


async def test_record_start_of_an_unknown_task_is_0_and_creates_nothing(database_url: str) -> None:
    known = str(uuid.uuid4())

    async with engine_for(database_url) as engine:
        await _insert_task(engine, known)
        assert await record_start(engine, str(uuid.uuid4())) == 0
        async with engine.connect() as conn:
            tasks = (await conn.execute(select(func.count()).select_from(TaskRecord))).scalar()
        row = await _task_row(engine, known)

    assert tasks == 1
    assert (row.deliveries, row.started_at) == (0, None)


@pytest.mark.postgres
async def test_a_database_refusing_connections_is_a_retryable_error_not_a_failure(
    postgres_url: str, refused_postgres_url: str
) -> None:
    # "too many clients" reaches SQLAlchemy as a plain DBAPIError; taken for a bug, it would
    # fail the task for good instead of letting Celery try it again.
    async with engine_for(postgres_url):
        pass  # migrated by a role that may connect
    engine = create_engine(refused_postgres_url)
    try:
        with pytest.raises(RetryableError, match="too many"):
            await store_projects(engine, project_items(3), BATCH)
        with pytest.raises(RetryableError, match="too many"):
            await record_start(engine, str(uuid.uuid4()))
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_connections_killed_while_idle_in_the_pool_do_not_fail_a_store(
    postgres_url: str,
) -> None:
    # The worker's engine does not ping a connection before use (see worker.runtime): a
    # database restart or an idle timeout that killed its pooled connections must cost a local
    # retry on fresh ones, not a failed or retried task.
    async with engine_for(postgres_url):
        pass  # migrated
    engine = create_engine(postgres_url, pool_size=4, max_overflow=0, pre_ping=False)
    try:
        # Fill the pool with idle connections.
        await asyncio.gather(*(record_start(engine, str(uuid.uuid4())) for _ in range(4)))
        async with engine_for(postgres_url, migrate=False) as admin, admin.begin() as conn:
            killed = (
                await conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            ).scalar_one()
        assert killed >= 1
        items = project_items(5)
        counts = await store_projects(engine, items, BATCH)
        assert counts == StoreCounts(created=5)
        assert await record_start(engine, str(uuid.uuid4())) == 0
    finally:
        await engine.dispose()


async def test_a_store_that_cannot_get_a_connection_in_time_is_retryable(database_url: str) -> None:
    # Every connection busy (a slow database): the task fails this try, soon, as retryable,
    # instead of queueing behind the others for as long as they take.
    async with engine_for(database_url):
        pass  # migrated
    engine = create_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        async with engine.connect():  # the only connection, held
            started = time.monotonic()
            with pytest.raises(RetryableError, match="unreachable or busy"):
                await record_start(engine, str(uuid.uuid4()))
            assert time.monotonic() - started < 5
    finally:
        await engine.dispose()

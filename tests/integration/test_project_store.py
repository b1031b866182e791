"""ProjectStore on real databases: an index serves every ListProjects order (PostgreSQL's plans),
keyset pages add up to the plain ORDER BY (SQLite and PostgreSQL), and the feed reads in
(revision, id) order.

Rows are stored the way the worker stores them (`worker.store.store_projects`), so revisions,
ties in updated_at (one timestamp per batch) and start_sort are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.db import create_engine
from core.migrate import upgrade_to_head
from gateway.project_store import (
    BEGINNING,
    DEFAULT_ORDER,
    ORDERS,
    Filters,
    Position,
    ProjectStore,
    StoredProject,
)
from tests.support.projects import project_item
from tests.support.services import postgres_database
from worker.parse import ProjectItem
from worker.store import store_projects

POSTGRES = pytest.param("postgresql", marks=pytest.mark.postgres)


@pytest.fixture(params=["sqlite", POSTGRES])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of the parametrized kind (not yet migrated)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'projects.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@contextlib.asynccontextmanager
async def engine_for(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url)
    try:
        await upgrade_to_head(engine)
        yield engine
    finally:
        await engine.dispose()


def item(n: int, **changes: Any) -> ProjectItem:
    """Project n with start dates that repeat (ties) and a third without one."""
    start = None if n % 3 == 0 else dt.date(2025, 1, 1) + dt.timedelta(days=n % 7)
    return dataclasses.replace(project_item(n, start_date=start), **changes)


# --- (a), (b) PostgreSQL's plans --------------------------------------------------------------

PLANNED_ROWS = 10_000
# The index each order's keyset walks (the url's is its unique constraint's).
ORDER_INDEXES = {
    "update_time desc": "ix_projects_updated_at",
    "create_time desc": "ix_projects_first_seen_at",
    "start_date desc": "ix_projects_start_sort",
    "url": "projects_url_key",
}


async def _fill_for_plans(url: str) -> None:
    # One in twenty inactive: `is_active = false` is selective, as a filter worth an index is.
    items = [item(n, is_active=n % 20 != 0) for n in range(PLANNED_ROWS)]
    async with engine_for(url) as engine:
        await store_projects(engine, items, 100)
        # A second harvest that changes a tenth of them: updated_at and revision spread out.
        await store_projects(
            engine, [item(n, title=f"Renamed {n}") for n in range(0, PLANNED_ROWS, 10)], 100
        )
        async with engine.connect() as conn:
            await conn.execute(text("ANALYZE projects"))
            await conn.commit()


@pytest.fixture(scope="module")
def planned_url() -> Iterator[str]:
    """A PostgreSQL database of a few thousand harvested projects, analyzed; shared, read only."""
    with postgres_database() as url:
        asyncio.run(_fill_for_plans(url))
        yield url


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


async def explain(conn: AsyncConnection, statement: Any) -> list[dict[str, Any]]:
    """The nodes of the plan PostgreSQL makes for `statement`, values inlined as the driver's."""
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    rows = (await conn.execute(text(f"EXPLAIN (FORMAT JSON) {compiled}"))).scalar_one()
    return list(plan_nodes(rows[0]["Plan"]))


def describe(nodes: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{n['Node Type']} {n.get('Index Name', '')} {n.get('Index Cond', '')}".strip()
        for n in nodes
    )


def index_scan(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The plan's one index scan; there is no Sort: the index gives the order."""
    assert not [n for n in nodes if "Sort" in n["Node Type"]], describe(nodes)
    scans = [n for n in nodes if n["Node Type"] in ("Index Scan", "Index Only Scan")]
    assert len(scans) == 1, describe(nodes)
    return scans[0]


async def a_key(engine: AsyncEngine, order_name: str, filters: Filters) -> list[Any]:
    """The key of a row a few pages in: where a later page starts."""
    order = ORDERS[order_name]
    rows = await ProjectStore(engine).page(order, filters, None, 300)
    # Past the last row a page is empty, and the planner may rightly sort its few rows instead.
    assert len(rows) == 300, f"no row 300 rows in: there are {len(rows)}"
    return list(order.key(rows[-1]))


@pytest.mark.postgres
@pytest.mark.parametrize("later_page", [False, True], ids=["first-page", "later-page"])
@pytest.mark.parametrize("order_name", list(ORDERS))
async def test_every_order_is_an_index_scan_without_a_sort(
    planned_url: str, order_name: str, later_page: bool
) -> None:
    order = ORDERS[order_name]
    async with engine_for(planned_url) as engine:
        after = await a_key(engine, order_name, Filters()) if later_page else None
        async with engine.connect() as conn:
            nodes = await explain(conn, ProjectStore.page_statement(order, Filters(), after, 51))

    scan = index_scan(nodes)
    assert scan["Index Name"] == ORDER_INDEXES[order_name], describe(nodes)
    # Both descending orders walk their ascending (column, id) index backward.
    assert scan["Scan Direction"] == ("Backward" if order.descending else "Forward")
    if later_page:
        # The seek is in the index, not a filter over the rows before it.
        assert order.column.key in scan.get("Index Cond", ""), describe(nodes)
        assert "Filter" not in scan, describe(nodes)


@pytest.mark.postgres
@pytest.mark.parametrize("later_page", [False, True], ids=["first-page", "later-page"])
async def test_the_default_order_filtered_by_a_rare_is_active_uses_its_own_index(
    planned_url: str, later_page: bool
) -> None:
    filters = Filters(is_active=False)
    order = ORDERS[DEFAULT_ORDER]
    async with engine_for(planned_url) as engine:
        after = await a_key(engine, DEFAULT_ORDER, filters) if later_page else None
        async with engine.connect() as conn:
            nodes = await explain(conn, ProjectStore.page_statement(order, filters, after, 51))

    scan = index_scan(nodes)
    assert scan["Index Name"] == "ix_projects_active_updated_at", describe(nodes)
    assert "is_active = false" in scan["Index Cond"], describe(nodes)


@pytest.mark.postgres
async def test_the_default_order_filtered_by_a_common_is_active_needs_no_sort(
    planned_url: str,
) -> None:
    """19 in 20 active: walking either index and skipping the rest is the cheap plan."""
    async with engine_for(planned_url) as engine, engine.connect() as conn:
        statement = ProjectStore.page_statement(
            ORDERS[DEFAULT_ORDER], Filters(is_active=True), None, 51
        )
        nodes = await explain(conn, statement)

    scan = index_scan(nodes)
    assert scan["Index Name"] in ("ix_projects_updated_at", "ix_projects_active_updated_at")


@pytest.mark.postgres
async def test_the_default_order_with_updated_after_seeks_in_its_index(planned_url: str) -> None:
    async with engine_for(planned_url) as engine:
        newest = (await ProjectStore(engine).page(ORDERS[DEFAULT_ORDER], Filters(), None, 1))[0]
        filters = Filters(updated_after=newest.updated_at - dt.timedelta(seconds=1))
        async with engine.connect() as conn:
            nodes = await explain(
                conn, ProjectStore.page_statement(ORDERS[DEFAULT_ORDER], filters, None, 51)
            )

    scan = index_scan(nodes)
    assert scan["Index Name"] == "ix_projects_updated_at", describe(nodes)
    assert "updated_at >" in scan["Index Cond"], describe(nodes)


async def _has_trigram_indexes(conn: AsyncConnection) -> bool:
    found = await conn.execute(
        text("SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'ix_projects_%_trgm'")
    )
    return bool(found.scalar_one() == 2)


@pytest.mark.postgres
async def test_the_query_filter_can_use_the_trigram_indexes(planned_url: str) -> None:
    async with engine_for(planned_url) as engine, engine.connect() as conn:
        if not await _has_trigram_indexes(conn):
            pytest.skip("pg_trgm is not available to this database: the query filter scans")
        # On a few thousand rows walking the order's index is cheaper; take that choice away
        # to see that the ILIKE of both columns is one the trigram indexes serve.
        await conn.execute(text("SET enable_seqscan = off"))
        await conn.execute(text("SET enable_indexscan = off"))
        statement = ProjectStore.page_statement(
            ORDERS[DEFAULT_ORDER], Filters(query="Renamed 12"), None, 51
        )
        nodes = await explain(conn, statement)

    bitmaps = {
        n["Index Name"]: n["Index Cond"] for n in nodes if n["Node Type"] == "Bitmap Index Scan"
    }
    assert set(bitmaps) == {"ix_projects_title_trgm", "ix_projects_description_trgm"}, describe(
        nodes
    )
    assert "~~*" in bitmaps["ix_projects_title_trgm"]  # ILIKE, as the filter is written


# --- (c) keyset pages equal the plain ORDER BY -------------------------------------------------

PAGE = 7
# The same orders, written as a reader would write them by hand: dateless projects last.
PLAIN_ORDER_BY = {
    "update_time desc": "updated_at DESC, id DESC",
    "create_time desc": "first_seen_at DESC, id DESC",
    "start_date desc": "start_date DESC NULLS LAST, id DESC",
    "url": "url",
}
FILTERS: dict[str, tuple[Filters, str, dict[str, Any]]] = {
    "none": (Filters(), "", {}),
    "active": (Filters(is_active=True), "WHERE is_active = :active", {"active": True}),
    "inactive": (Filters(is_active=False), "WHERE is_active = :active", {"active": False}),
    # Digits: the same matches whether or not the database's LIKE ignores case.
    "query": (Filters(query="1"), "WHERE title LIKE :q OR description LIKE :q", {"q": "%1%"}),
}


async def harvest_with_ties(engine: AsyncEngine) -> None:
    """60 projects in batches of 10 (a batch shares one timestamp), then some changed."""
    await store_projects(engine, [item(n) for n in range(60)], 10)
    # Changed in one batch: seven more rows sharing one updated_at, mixed with unchanged ones.
    again = [item(n, description=f"Changed {n}") if n % 8 == 0 else item(n) for n in range(40)]
    await store_projects(engine, again, 50)


async def plain_ids(
    engine: AsyncEngine, where: str, params: dict[str, Any], order: str
) -> list[int]:
    async with engine.connect() as conn:
        rows = await conn.execute(text(f"SELECT id FROM projects {where} ORDER BY {order}"), params)
        return [row.id for row in rows]


async def keyset_ids(store: ProjectStore, order_name: str, filters: Filters) -> list[StoredProject]:
    order = ORDERS[order_name]
    seen: list[StoredProject] = []
    after = None
    while True:
        rows = await store.page(order, filters, after, PAGE)
        seen += rows
        if len(rows) < PAGE:
            return seen
        after = order.key(rows[-1])


@pytest.mark.parametrize("filter_name", list(FILTERS))
async def test_keyset_pages_in_every_order_equal_the_plain_order_by(
    database_url: str, filter_name: str
) -> None:
    filters, where, params = FILTERS[filter_name]
    async with engine_for(database_url) as engine:
        await harvest_with_ties(engine)
        store = ProjectStore(engine)
        everything = await keyset_ids(store, "url", Filters())
        # The data has what makes keyset paging hard: equal keys, and projects without a date.
        assert len({p.updated_at for p in everything}) < len(everything) / 5
        assert len({p.first_seen_at for p in everything}) < len(everything) / 5
        assert len({p.start_date for p in everything}) < len(everything) / 5
        assert any(p.start_date is None for p in everything)

        for order_name, plain in PLAIN_ORDER_BY.items():
            paged = await keyset_ids(store, order_name, filters)
            expected = await plain_ids(engine, where, params, plain)
            assert [p.id for p in paged] == expected, order_name
            assert len(expected) > 2 * PAGE, order_name


async def test_projects_without_a_start_date_come_last_in_start_date_desc(
    database_url: str,
) -> None:
    async with engine_for(database_url) as engine:
        await harvest_with_ties(engine)
        paged = await keyset_ids(ProjectStore(engine), "start_date desc", Filters())

    dated = [p for p in paged if p.start_date is not None]
    assert paged[: len(dated)] == dated
    days = [p.start_date for p in dated if p.start_date is not None]
    assert days == sorted(days, reverse=True)
    dateless = paged[len(dated) :]
    assert dateless and all(p.start_date is None for p in dateless)
    assert [p.id for p in dateless] == sorted((p.id for p in dateless), reverse=True)


# --- (d) the feed -----------------------------------------------------------------------------


async def test_head_of_an_empty_table_is_the_beginning(database_url: str) -> None:
    async with engine_for(database_url) as engine:
        store = ProjectStore(engine)
        assert await store.head() == BEGINNING
        assert await store.changes_after(BEGINNING, None, 100) == []


async def test_changes_after_reads_in_revision_then_id_order(database_url: str) -> None:
    async with engine_for(database_url) as engine:
        store = ProjectStore(engine)
        first = await store_projects(engine, [item(n) for n in range(10)], 4)  # revisions 1-3
        await store_projects(engine, [item(n) for n in range(10, 15)], 100)  # revision 4
        # A changed project moves to the end, in its latest state; unchanged ones stay.
        renamed = await store_projects(engine, [item(2, title="Renamed 2"), item(3)], 100)
        changes = await store.changes_after(BEGINNING, None, 100)

        assert first.revision == 3 and renamed.revision == 5
        assert [p.position for p in changes] == sorted(p.position for p in changes)
        assert len(changes) == 15  # each project once
        assert [p.revision for p in changes] == [1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4, 4, 5]
        assert changes[-1].url == item(2).url and changes[-1].title == "Renamed 2"
        assert not changes[-1].created and all(p.created for p in changes[:-1])
        assert await store.head() == changes[-1].position

        # After any position: exactly what follows it, also within one revision.
        for cut in range(len(changes)):
            after = await store.changes_after(changes[cut].position, None, 100)
            assert after == changes[cut + 1 :]
        assert await store.changes_after(changes[4].position, None, 3) == changes[5:8]


async def test_changes_after_keeps_only_the_projects_asked_for(database_url: str) -> None:
    async with engine_for(database_url) as engine:
        store = ProjectStore(engine)
        await store_projects(engine, [item(n) for n in range(12)], 5)
        everything = await store.changes_after(BEGINNING, None, 100)

        for active in (True, False):
            wanted = [p for p in everything if p.is_active == active]
            assert wanted and len(wanted) < len(everything)
            assert await store.changes_after(BEGINNING, active, 100) == wanted
            assert await store.changes_after(BEGINNING, active, 2) == wanted[:2]
            middle = everything[5].position
            assert await store.changes_after(middle, active, 100) == [
                p for p in wanted if p.position > middle
            ]


async def test_a_harvest_that_only_lists_projects_again_is_no_change(database_url: str) -> None:
    async with engine_for(database_url) as engine:
        store = ProjectStore(engine)
        await store_projects(engine, [item(n) for n in range(6)], 100)
        head = await store.head()

        counts = await store_projects(engine, [item(n) for n in range(6)], 100)

        assert counts.revision == 0
        assert await store.head() == head
        assert await store.changes_after(head, None, 100) == []
        assert head == Position(1, max(p.id for p in await store.changes_after(BEGINNING, None, 9)))

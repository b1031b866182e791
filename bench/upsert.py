"""`upsert_rows_per_s_pg` and `upsert_rows_per_s_sqlite`: store 1,000 parsed items, half known.

Ours is `worker.store.store_projects` (one INSERT ... ON CONFLICT DO UPDATE per batch); the
baseline stores the same items with one upsert and one commit per row. Before every run the
table holds the same 500 of the 1,000 items (half of those with an older description, so the run
both inserts, updates and leaves rows unchanged); each side is timed on the wall clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from bench import data
from bench.common import Options, interleaved, say
from bench.report import Figure, median
from bench.services import ServiceMissing, postgres_database
from core.db import Project, create_engine, utcnow
from core.migrate import upgrade_to_head
from core.settings import get_settings
from worker.parse import ProjectItem, parse_listing
from worker.store import store_projects

ITEMS = 1000


def _items() -> list[ProjectItem]:
    items = parse_listing(data.listing(1, ITEMS), data.page_url(1), data.PROFILE).items
    assert len(items) == ITEMS
    return items


def _known(items: Sequence[ProjectItem]) -> list[ProjectItem]:
    """The half already stored: every other item, half of those as an older version."""
    known = list(items[::2])
    return [
        dataclasses.replace(item, description=item.description + " (old)") if i % 2 else item
        for i, item in enumerate(known)
    ]


async def upsert_row_by_row(engine: AsyncEngine, items: Sequence[ProjectItem]) -> None:
    """The baseline: one INSERT ... ON CONFLICT DO UPDATE and one commit per row."""
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    for item in items:
        now = utcnow()
        statement = insert(Project).values(
            url=item.url,
            title=item.title,
            description=item.description,
            is_active=item.is_active,
            start_date=item.start_date,
            first_seen_at=now,
            last_seen_at=now,
            updated_at=now,
        )
        excluded = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=[Project.url],
            set_={
                "title": excluded.title,
                "description": excluded.description,
                "is_active": excluded.is_active,
                "start_date": excluded.start_date,
                "last_seen_at": excluded.last_seen_at,
                "updated_at": excluded.updated_at,
            },
        )
        async with engine.begin() as conn:
            await conn.execute(statement)


class _Bench:
    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        # As the worker's engine is: no ping before each statement, for either side.
        self.engine = create_engine(url, pre_ping=False)
        self.items = _items()
        self.known = _known(self.items)
        self.batch_size = get_settings().upsert_batch_size
        self.loop.run_until_complete(upgrade_to_head(self.engine))

    async def _reset(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(Project))
        await store_projects(self.engine, self.known, self.batch_size)

    async def _check(self) -> None:
        """Every item stored once, and every older version refreshed."""
        stale = Project.description.endswith(" (old)")
        async with self.engine.connect() as conn:
            rows, links, old = (
                await conn.execute(
                    select(
                        func.count(),
                        func.count(Project.url.distinct()),
                        func.count().filter(stale),
                    )
                )
            ).one()
        assert (rows, links, old) == (ITEMS, ITEMS, 0), (rows, links, old)

    def side(self, store: Callable[[], Awaitable[object]]) -> Callable[[], float]:
        def run() -> float:
            self.loop.run_until_complete(self._reset())
            started = time.perf_counter()
            self.loop.run_until_complete(store())
            elapsed = time.perf_counter() - started
            self.loop.run_until_complete(self._check())
            return ITEMS / elapsed

        return run

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.dispose())
        self.loop.close()


def _measure(name: str, url: str, target: float, options: Options) -> Figure:
    bench = _Bench(url)
    try:
        samples = interleaved(
            options.runs,
            {
                "ours": bench.side(
                    lambda: store_projects(bench.engine, bench.items, bench.batch_size)
                ),
                "row by row": bench.side(lambda: upsert_row_by_row(bench.engine, bench.items)),
            },
        )
    finally:
        bench.close()
    return Figure(
        name,
        median(samples["ours"]),
        median(samples["row by row"]),
        "rows/s",
        higher_is_better=True,
        target=target,
        note="baseline: one upsert and one commit per row",
        samples={"ours": samples["ours"], "baseline": samples["row by row"]},
    )


def run(options: Options) -> list[Figure]:
    figures: list[Figure] = []
    say(f"upsert: {ITEMS} items, {ITEMS // 2} of them already stored; PostgreSQL")
    try:
        with postgres_database() as url:
            figures.append(_measure("upsert_rows_per_s_pg", url, 10.0, options))
    except ServiceMissing as exc:
        say(f"upsert: skipping the PostgreSQL figure, {exc}")
    say("upsert: SQLite file in WAL mode")
    with tempfile.TemporaryDirectory(prefix="bench-upsert-") as directory:
        url = f"sqlite+aiosqlite:///{Path(directory) / 'projects.db'}"
        figures.append(_measure("upsert_rows_per_s_sqlite", url, 20.0, options))
    return figures

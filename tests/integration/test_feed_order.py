"""The feed's revisions follow commit order, even when two writers commit out of turn.

The pitfall: a number drawn when a transaction writes is not the order in which transactions
commit. Writer A draws revision 1, writer B draws 2 and commits first; a reader that saw 2 and
resumes after it never sees 1. `worker.store` stamps revisions from one row-locked counter,
bumped by the upsert itself and held until its commit, so B waits for A. Both are played here
on PostgreSQL with the production reader (`ProjectStore.changes_after`): the naive drawing
loses A's rows, the store's does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.db import Feed, Project, create_engine, utcnow
from core.migrate import upgrade_to_head
from gateway.project_store import BEGINNING, Position, ProjectStore
from worker.store import upsert_statement

pytestmark = pytest.mark.postgres

# Writes the rows for the urls in the connection's open transaction; the revision they got.
Write = Callable[[AsyncConnection, AsyncEngine, list[str]], Awaitable[int]]


def rows_for(urls: list[str]) -> list[dict[str, object]]:
    now = utcnow()
    return [
        {
            "url": url,
            "title": url,
            "description": "",
            "is_active": True,
            "start_date": None,
            "first_seen_at": now,
            "last_seen_at": now,
            "updated_at": now,
        }
        for url in urls
    ]


async def write_as_the_store_does(conn: AsyncConnection, _: AsyncEngine, urls: list[str]) -> int:
    """The store's statement: the counter's row lock is taken by it and held until `conn`
    commits."""
    returned = (await conn.execute(upsert_statement("postgresql"), rows_for(urls))).all()
    return max(int(row.revision) for row in returned)


async def write_drawn_apart(conn: AsyncConnection, engine: AsyncEngine, urls: list[str]) -> int:
    """The naive way: the rows upserted, then a number drawn as a sequence would give it,
    committed at once."""
    plain = upsert_statement("postgresql", stamp=False)
    ids = [row.id for row in (await conn.execute(plain, rows_for(urls))).all()]
    async with engine.begin() as draw:
        revision = int(
            (
                await draw.execute(
                    update(Feed)
                    .where(Feed.id == 1)
                    .values(revision=Feed.revision + 1)
                    .returning(Feed.revision)
                )
            ).scalar_one()
        )
    await conn.execute(update(Project).where(Project.id.in_(ids)).values(revision=revision))
    return revision


class Reader:
    """A watcher that resumes after the last position it saw, as a client with a cursor does."""

    def __init__(self, store: ProjectStore) -> None:
        self._store = store
        self.position: Position = BEGINNING
        self.seen: list[str] = []

    async def read(self) -> None:
        for row in await self._store.changes_after(self.position, None, 1000):
            self.position = row.position
            self.seen.append(row.url)


async def waiting_on_a_lock(engine: AsyncEngine, pid: int) -> bool:
    async with engine.connect() as conn:
        event = (
            await conn.execute(
                text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": pid},
            )
        ).scalar_one_or_none()
    return event == "Lock"


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    await upgrade_to_head(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def play(engine: AsyncEngine, write: Write) -> list[str]:
    """A stamps and stays open; B writes and commits if it can; the reader reads between."""
    reader = Reader(ProjectStore(engine))
    a_urls = [f"https://example.test/a/{n}" for n in range(3)]
    b_urls = [f"https://example.test/b/{n}" for n in range(3)]
    async with engine.connect() as a, engine.connect() as b:
        await a.begin()
        await write(a, engine, a_urls)
        pid = (await b.execute(text("SELECT pg_backend_pid()"))).scalar_one()

        async def writer_b() -> None:  # in the transaction the pid query began
            await write(b, engine, b_urls)
            await b.commit()

        b_done = asyncio.ensure_future(writer_b())
        # B either commits (nothing stops it) or waits for A's lock; either way, then read.
        async with asyncio.timeout(10):
            # Another process's state, which no event of ours can tell.
            while not b_done.done() and not await waiting_on_a_lock(engine, pid):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await reader.read()
        await a.commit()
        async with asyncio.timeout(10):
            await b_done
    await reader.read()
    return reader.seen


async def test_revisions_drawn_at_write_time_lose_a_commit_that_lands_late(
    engine: AsyncEngine,
) -> None:
    # The pitfall this design avoids, shown on the same reader: B commits first with the higher
    # revision; the reader moves past it, and A's rows, committed later below it, are missed.
    seen = await play(engine, write_drawn_apart)
    assert seen == [f"https://example.test/b/{n}" for n in range(3)]


async def test_revisions_stamped_by_the_upsert_under_the_feed_lock_follow_commit_order(
    engine: AsyncEngine,
) -> None:
    seen = await play(engine, write_as_the_store_does)
    assert seen == [f"https://example.test/{w}/{n}" for w in "ab" for n in range(3)]

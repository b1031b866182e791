"""Bring the database schema to the newest Alembic revision, safely from many processes at once.

Gateways and workers migrate at start, once the database answers (`migrate_when_reachable`), so
a fresh database needs no manual step; the lock (PostgreSQL advisory lock, a file lock beside a
SQLite file) makes the first process migrate and the others wait and find nothing left to do.
`python -m core.migrate` does the same from a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.db import create_engine, is_unreachable
from core.settings import get_settings
from core.waiting import until_done

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every process of this application.
_PG_MIGRATION_LOCK = 0x70726F6A


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "core:migrations")
    return config


def _upgrade(connection: Connection) -> None:
    config = _alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


@contextlib.asynccontextmanager
async def _sqlite_file_lock(database: str | None) -> AsyncIterator[None]:
    if not database or database == ":memory:":
        yield
        return
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".migrate.lock")
    with lock_path.open("w") as lock_file:
        await asyncio.to_thread(fcntl.flock, lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextlib.asynccontextmanager
async def _pg_advisory_lock(connection: AsyncConnection) -> AsyncIterator[None]:
    await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    try:
        yield
    finally:
        await connection.execute(
            text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_MIGRATION_LOCK}
        )
        await connection.commit()


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Apply every migration not yet applied to the engine's database."""
    if engine.dialect.name == "sqlite":
        async with _sqlite_file_lock(engine.url.database), engine.connect() as connection:
            await connection.run_sync(_upgrade)
            await connection.commit()
    else:
        async with engine.connect() as connection, _pg_advisory_lock(connection):
            await connection.run_sync(_upgrade)
            await connection.commit()
    log.info("database schema is up to date")


async def migrate(database_url: str, connect_timeout: float | None = None) -> None:
    """`upgrade_to_head` on an engine of its own, for a process that has none yet.

    Its connect is bounded by `connect_timeout`, its statements are not: a migration may rewrite
    a big table, and waits on the lock while another process migrates.
    """
    engine = create_engine(database_url, pool_size=1, connect_timeout=connect_timeout)
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()


async def migrate_when_reachable(
    database_url: str,
    connect_timeout: float,
    on_failure: Callable[[BaseException], None] = lambda _exc: None,
) -> None:
    """`migrate`, tried again (with backoff, logged once a minute) while the database is
    unreachable: a process started before its database comes up when the database does."""
    await until_done(
        lambda: migrate(database_url, connect_timeout),
        "the database",
        is_unreachable,
        on_failure=on_failure,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(migrate(get_settings().resolved_database_url))

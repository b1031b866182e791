"""The database: table models shared by gateway and worker, and the one engine factory.

`projects` holds what the worker harvests; the link (`url`) is a project's identity.
`tasks` is the gateway's record of every task it issued, which every gateway instance sees, and
which the worker marks when it starts a task (so GetStatus can tell a task never issued from one
still queued, and a task redelivered after crashes from a fresh one).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Computed,
    Date,
    DateTime,
    Dialect,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# SQLite has no 64-bit autoincrement type name of its own; INTEGER PRIMARY KEY is its rowid.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")

MAX_URL_LENGTH = 2048
MAX_CLIENT_LENGTH = 64
MAX_REQUEST_ID_LENGTH = 128
SQLITE_BUSY_TIMEOUT_MS = 30_000


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and always read back timezone-aware, on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class Project(Base):
    """A harvested project; one row per link."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(String(MAX_URL_LENGTH), unique=True)
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    is_active: Mapped[bool] = mapped_column(Boolean)
    start_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    first_seen_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    # When a harvest last changed one of the fields above (first_seen_at until then).
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    # The feed's revision of the commit that last created or changed the row (see `Feed`).
    revision: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # start_date, or a day before any other: what "start_date desc" orders by, dateless last.
    start_sort: Mapped[dt.date] = mapped_column(
        Date, Computed("coalesce(start_date, '0001-01-01')")
    )


class Feed(Base):
    """The one row that orders every change to `projects`: the WatchProjects feed's clock.

    A commit that creates or changes projects bumps `revision` and stamps the rows with it, as
    its last statements, so the row lock it takes is held until it commits: revisions are
    handed out in commit order. A reader that has seen revision r therefore never sees a later
    commit appear with a revision below r (a sequence drawn at INSERT time gives no such
    promise). It also names the deployment and holds the key that signs tokens.
    """

    __tablename__ = "feed"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment: Mapped[str] = mapped_column(String(36))
    signing_key: Mapped[str] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(BigInteger)


class TaskRecord(Base):
    """A task the gateway issued: who asked, for which page, and what the worker saw of it."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("client", "request_id", name="uq_tasks_client_request_id"),
        Index("ix_tasks_enqueued_at", "enqueued_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    client: Mapped[str] = mapped_column(String(MAX_CLIENT_LENGTH))
    request_id: Mapped[str | None] = mapped_column(String(MAX_REQUEST_ID_LENGTH), nullable=True)
    page: Mapped[int] = mapped_column(Integer)
    enqueued_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    # When the broker confirmed the task; NULL while the publish of a task with a request_id is
    # under way (or was cut off). Tasks without one are written as confirmed: nothing waits.
    published_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # How many times a worker has started this task (Celery retries and crash redeliveries).
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    # Set by the reconciler when the broker lost the task: the task is then FAILURE with this.
    lost_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


# SQLSTATE classes of a database that cannot serve now but may in a moment: connection
# exceptions (08), insufficient resources such as "too many clients" (53), operator
# intervention such as a shutdown or a server still starting (57P).
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53", "57P")
# Contention between concurrent writers: serialization failure, deadlock, lock not available.
_CONTENTION_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


def is_transient(exc: DBAPIError) -> bool:
    """Whether the same statement may well succeed if simply tried again shortly.

    asyncpg's errors reach SQLAlchemy as plain DBAPIError (not OperationalError) whatever they
    mean, so the SQLSTATE decides: "too many clients" at connect is one of them.
    """
    if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if not isinstance(sqlstate, str):
        return False
    return sqlstate in _CONTENTION_SQLSTATES or sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES)


def dialect_insert(dialect: str) -> Any:
    """INSERT with ON CONFLICT for a dialect name (PostgreSQL's or SQLite's)."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (GetStatus) run beside the one writer; the busy timeout makes concurrent
    # writers (two workers, the gateway) wait their turn instead of failing "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int | None = None,
    pre_ping: bool = True,
    pool_timeout: float = 30.0,
) -> AsyncEngine:
    """The process's engine for `url` (SQLite through aiosqlite or PostgreSQL through asyncpg).

    It opens at most `pool_size` + `max_overflow` (by default twice `pool_size`) connections.
    `pre_ping` tests each connection with a round trip as it leaves the pool, so that one that
    died idle (a database restart) is replaced instead of failing a statement; a caller that
    retries its transient errors anyway can spare that round trip. A caller waits at most
    `pool_timeout` seconds for a connection when all are in use (SQLAlchemy's TimeoutError).
    """
    overflow = pool_size if max_overflow is None else max_overflow
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=overflow,
            pool_pre_ping=pre_ping,
            pool_timeout=pool_timeout,
        )
        event.listen(engine.sync_engine, "connect", _tune_sqlite)
        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=overflow,
        pool_pre_ping=pre_ping,
        pool_timeout=pool_timeout,
        pool_recycle=1800,
    )


@contextlib.asynccontextmanager
async def single_statement(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for one statement, which the database commits as it runs it.

    A single statement is atomic by itself; SQLAlchemy would otherwise wrap it in a transaction
    of its own (even a SELECT), a BEGIN and a COMMIT or ROLLBACK round trip more. Not for two
    statements that must commit together: use `engine.begin()` for those.
    """
    async with engine.connect() as conn:
        yield await conn.execution_options(isolation_level="AUTOCOMMIT")

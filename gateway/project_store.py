"""The gateway's reads of the harvested projects: pages in four orders, one project, the feed.

Pages are keyset (seek) pages: each continues after the last row of the previous one along an
index on its order, so a page deep in the table costs what the first one does, and a row
inserted meanwhile is never returned twice. The feed is every row in (revision, id) order:
revisions are handed out in commit order (`core.db.Feed`), so reading after a position never
misses a commit that lands later.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Executable, Select, and_, literal, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import Feed, Project, UtcDateTime, single_statement
from gateway.database import store_errors
from gateway.health import OnUnavailable, nobody

COLUMNS = (
    Project.id,
    Project.url,
    Project.title,
    Project.description,
    Project.is_active,
    Project.start_date,
    Project.first_seen_at,
    Project.updated_at,
    Project.last_seen_at,
    Project.revision,
    Project.start_sort,
)


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A place in the feed: every change after it is later in commit order."""

    revision: int
    id: int


# Before every row, those stored before the feed existed (revision 0) included.
BEGINNING = Position(-1, 0)


class StoredProject(NamedTuple):
    """A project's row as the gateway reads it.

    A named tuple, made from a row with `_make` in one C call: a frozen dataclass's `__init__`
    sets each of the 11 fields through `object.__setattr__`, about a tenth of the gateway's
    CPU a row of ListProjects (bench/README.md, list_projects).
    """

    id: int
    url: str
    title: str
    description: str
    is_active: bool
    start_date: dt.date | None
    first_seen_at: dt.datetime
    updated_at: dt.datetime
    last_seen_at: dt.datetime
    revision: int
    start_sort: dt.date

    @property
    def position(self) -> Position:
        return Position(self.revision, self.id)

    @property
    def created(self) -> bool:
        """Whether its latest change was its creation (no harvest has changed it since)."""
        return self.updated_at == self.first_seen_at


@dataclass(frozen=True, slots=True)
class Order:
    """One order of ListProjects: a column, which way, and whether ids break its ties."""

    column: Any
    descending: bool
    unique: bool = False

    def key(self, project: StoredProject) -> tuple[Any, ...]:
        value = getattr(project, self.column.key)
        return (value,) if self.unique else (value, project.id)

    def sort(self) -> list[Any]:
        columns = [self.column] if self.unique else [self.column, Project.id]
        return [column.desc() if self.descending else column.asc() for column in columns]

    def after(self, key: Sequence[Any]) -> ColumnElement[bool]:
        """Rows past `key` (the last row of the previous page) in this order."""
        mine = [self.column] if self.unique else [self.column, Project.id]
        theirs = [literal(value, column.type) for value, column in zip(key, mine, strict=True)]
        left: ColumnElement[Any] = mine[0] if self.unique else tuple_(*mine)
        right: ColumnElement[Any] = theirs[0] if self.unique else tuple_(*theirs)
        return left < right if self.descending else left > right


ORDERS: dict[str, Order] = {
    "update_time desc": Order(Project.updated_at, descending=True),
    "create_time desc": Order(Project.first_seen_at, descending=True),
    # start_sort is start_date, or a day before any other: dateless projects come last.
    "start_date desc": Order(Project.start_sort, descending=True),
    "url": Order(Project.url, descending=False, unique=True),
}
DEFAULT_ORDER = "update_time desc"


@dataclass(frozen=True, slots=True)
class Filters:
    """ListProjects' filters; they combine with AND."""

    is_active: bool | None = None
    updated_after: dt.datetime | None = None
    query: str = ""

    def conditions(self) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if self.is_active is not None:
            conditions.append(Project.is_active == self.is_active)
        if self.updated_after is not None:
            conditions.append(Project.updated_at > literal(self.updated_after, UtcDateTime()))
        if self.query:
            # ILIKE on PostgreSQL (a trigram index serves it); lower() LIKE lower() on SQLite.
            pattern = "%" + _escape_like(self.query) + "%"
            conditions.append(
                or_(
                    Project.title.ilike(pattern, escape="\\"),
                    Project.description.ilike(pattern, escape="\\"),
                )
            )
        return conditions


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ProjectStore:
    def __init__(self, engine: AsyncEngine, on_unavailable: OnUnavailable = nobody) -> None:
        self._engine = engine
        self._on_unavailable = on_unavailable

    async def _all(self, statement: Executable) -> list[StoredProject]:
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            rows = await conn.execute(statement)
            return list(map(StoredProject._make, rows))

    @staticmethod
    def page_statement(
        order: Order, filters: Filters, after: Sequence[Any] | None, limit: int
    ) -> Select[*tuple[Any, ...]]:
        """The SELECT `page` runs (tests EXPLAIN it to see that an index serves each order)."""
        conditions = filters.conditions()
        if after is not None:
            conditions.append(order.after(after))
        statement = select(*COLUMNS).where(and_(True, *conditions))
        return statement.order_by(*order.sort()).limit(limit)

    async def page(
        self, order: Order, filters: Filters, after: Sequence[Any] | None, limit: int
    ) -> list[StoredProject]:
        """Up to `limit` projects in `order` that pass `filters`, after the key `after`."""
        return await self._all(self.page_statement(order, filters, after, limit))

    async def by_id(self, project_id: int) -> StoredProject | None:
        found = await self._all(select(*COLUMNS).where(Project.id == project_id))
        return found[0] if found else None

    async def by_url(self, url: str) -> StoredProject | None:
        found = await self._all(select(*COLUMNS).where(Project.url == url))
        return found[0] if found else None

    async def changes_after(
        self, position: Position, is_active: bool | None, limit: int
    ) -> list[StoredProject]:
        """Up to `limit` projects whose latest change comes after `position`, in commit order."""
        mine = tuple_(Project.revision, Project.id)
        statement = select(*COLUMNS).where(mine > tuple_(position.revision, position.id))
        if is_active is not None:
            statement = statement.where(Project.is_active == is_active)
        return await self._all(statement.order_by(Project.revision, Project.id).limit(limit))

    async def head(self) -> Position:
        """The feed's last position now: what a watcher that wants only later changes starts at."""
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            row = (
                await conn.execute(
                    select(Project.revision, Project.id)
                    .order_by(Project.revision.desc(), Project.id.desc())
                    .limit(1)
                )
            ).first()
        return BEGINNING if row is None else Position(row.revision, row.id)

    async def deployment(self) -> tuple[str, str]:
        """This deployment's id and its stored signing key."""
        async with store_errors(self._on_unavailable), single_statement(self._engine) as conn:
            row = (
                await conn.execute(select(Feed.deployment, Feed.signing_key).where(Feed.id == 1))
            ).one()
        return row.deployment, row.signing_key

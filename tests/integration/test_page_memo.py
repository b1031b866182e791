"""A page's memo (its answer's validators and links) through a task's fetch -> parse -> store.

The task's own path (`worker.task._fetch_parse_store`) on a real database of each kind, with the
source faked: what it answers is the test's. Every statement that reaches the database is
recorded, so the tests see which ones a page's memo cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import PageMemo
from core.settings import Settings
from sample_site.pages import render_listing, sample_page
from tests.support.databases import engine_for
from worker.fetch import FetchedPage, Validators
from worker.task import _fetch_parse_store

PAGE = 3
SOURCE = "http://listing.test/projects?page={page}"


@dataclass
class _Source:
    """Answers each fetch with the next of `answers`; keeps the validators each was sent."""

    answers: list[FetchedPage]
    sent: list[Validators | None] = field(default_factory=list)

    async def fetch(self, url: str, validators: Validators | None = None, **_: Any) -> FetchedPage:
        self.sent.append(validators)
        return self.answers.pop(0)


class _Events:
    async def publish(self, event: Any) -> None:
        return None


@dataclass
class _Runtime:
    settings: Settings
    engine: AsyncEngine
    source: _Source
    events: _Events = field(default_factory=_Events)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with engine_for(database_url) as engine:
        yield engine


def _answer(validators: Validators | None = None) -> FetchedPage:
    body = render_listing(sample_page(PAGE)).encode()
    return FetchedPage(SOURCE.format(page=PAGE), body, "utf-8", validators or Validators())


def _memo_statements(engine: AsyncEngine) -> list[str]:
    """The statements that will reach `engine` and name the memo's table, as they come."""
    seen: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "page_memos" in statement:
            seen.append(statement.split(maxsplit=1)[0].upper())

    return seen


async def _harvest(engine: AsyncEngine, source: _Source) -> None:
    runtime: Any = _Runtime(Settings(source_url=SOURCE), engine, source)
    async with asyncio.timeout(30) as limit:
        result = await _fetch_parse_store(runtime, PAGE, "no-such-task", limit)
    assert result.found > 0


async def _memo(engine: AsyncEngine) -> tuple[str | None, str | None] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(PageMemo.etag, PageMemo.last_modified))).first()
    return None if row is None else (row.etag, row.last_modified)


async def test_an_answer_without_validators_costs_no_memo_write(engine: AsyncEngine) -> None:
    statements = _memo_statements(engine)
    await _harvest(engine, _Source([_answer()]))
    await _harvest(engine, _Source([_answer()]))
    # Each harvest reads the memo; with nothing to keep and nothing kept, none is written.
    assert statements == ["SELECT", "SELECT"]
    assert await _memo(engine) is None


async def test_validators_are_kept_and_forgotten_when_an_answer_has_none(
    engine: AsyncEngine,
) -> None:
    statements = _memo_statements(engine)
    with_validators = Validators('"v1"', "Sun, 06 Dec 2026 10:00:00 GMT")
    source = _Source([_answer(with_validators), _answer()])
    await _harvest(engine, source)
    assert statements == ["SELECT", "INSERT"]
    assert await _memo(engine) == (with_validators.etag, with_validators.last_modified)

    statements.clear()
    await _harvest(engine, source)
    assert source.sent == [None, with_validators]  # the second fetch was a conditional one
    assert statements == ["SELECT", "DELETE"]
    assert await _memo(engine) is None

"""The original design's worker, rebuilt as the harvest baseline (not used in production).

    celery -A bench.baseline_worker worker --pool prefork --concurrency 2

What the FastAPI + Celery design did, on the same broker and database as ours: a prefork pool
running one task at a time per process; `asyncio.run` per task, so every task makes its own
HTTP client and database connection; BeautifulSoup on html.parser; one ORM `session.add` per
row into `baseline_projects` (the bench creates it with `create_all`); tasks sent by `.delay()`.
It reads the same settings as ours (CELERY_BROKER_URL, DATABASE_URL, SOURCE_URL, TASK_QUEUE,
REDIS_KEY_PREFIX, ...) and takes its own queue beside TASK_QUEUE.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import httpx
from celery import Celery, Task
from sqlalchemy import Boolean, Date, Integer, String, Text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

from bench.reference_parsers import parse_with_bs4
from core.settings import Settings, get_settings

TASK_NAME = "bench.baseline.harvest_page"


class Base(DeclarativeBase):
    pass


class BaselineProject(Base):
    """A project as the original design stored it: a plain row per item, no upsert."""

    __tablename__ = "baseline_projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(String(2048))
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    is_active: Mapped[bool] = mapped_column(Boolean)
    start_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)


def make_app(settings: Settings) -> tuple[Celery, Task[[int], dict[str, Any]]]:
    """The baseline's Celery app and task, on the broker and result store of `settings`."""
    broker = settings.celery_broker_url
    app = Celery(
        "bench.baseline_worker",
        broker=broker,
        backend=settings.celery_result_backend or broker,
        set_as_current=False,
    )
    prefix = {"global_keyprefix": settings.redis_key_prefix} if settings.redis_key_prefix else {}
    # Celery's defaults otherwise: early acks, a prefetch of 4, no STARTED state.
    app.conf.update(
        task_default_queue=f"{settings.task_queue}-baseline",
        broker_transport_options=prefix,
        result_backend_transport_options=prefix,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name=TASK_NAME)
    def harvest_page(page: int) -> dict[str, Any]:
        return asyncio.run(_harvest(settings, page))

    return app, harvest_page


async def _harvest(settings: Settings, page: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=settings.fetch_timeout_seconds) as client:
        response = await client.get(settings.page_url(page))
        response.raise_for_status()
    items = parse_with_bs4(response.content, str(response.url), settings.source_profile)
    # A connection per task: a pooled one would belong to the event loop of an earlier task,
    # which `asyncio.run` has closed.
    engine = create_async_engine(settings.resolved_database_url, poolclass=NullPool)
    try:
        async with AsyncSession(engine) as session:
            for item in items:
                session.add(
                    BaselineProject(
                        url=item.url,
                        title=item.title,
                        description=item.description,
                        is_active=item.is_active,
                        start_date=item.start_date,
                    )
                )
            await session.commit()
    finally:
        await engine.dispose()
    return {"page": page, "found": len(items)}


# For `celery -A bench.baseline_worker worker`: the settings of the worker's environment.
app, harvest_page = make_app(get_settings())

"""The worker's Celery app: `celery -A worker.app worker` (see the README for the full line).

It registers the harvest task and ties the process's runtime (event loop, HTTP client, engine)
to the worker's start and shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from celery import signals

from core.celery_config import make_celery
from core.db import create_engine
from core.gc_tuning import freeze_long_lived_objects
from core.migrate import upgrade_to_head
from core.settings import get_settings
from worker import kombu_fixes
from worker.runtime import close_runtime
from worker.task import register

log = logging.getLogger(__name__)

kombu_fixes.apply()
# One INFO line per fetched page costs more than it tells; failures are logged by the task.
logging.getLogger("httpx").setLevel(logging.WARNING)
settings = get_settings()
app = make_celery(settings, "worker")
harvest_page = register(app)


async def _migrate() -> None:
    engine = create_engine(settings.resolved_database_url)
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()


@signals.worker_init.connect
def _prepare_database(**_: Any) -> None:
    # Before any pool exists, so no event loop or connection is inherited by a forked child.
    asyncio.run(_migrate())


@signals.worker_ready.connect
def _freeze_startup_objects(**_: Any) -> None:
    freeze_long_lived_objects()


@signals.worker_shutdown.connect
@signals.worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    close_runtime()

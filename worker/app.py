"""The worker's Celery app: `celery -A worker.app worker` (see the README for the full line).

Importing this module builds nothing: Celery reads the configuration (and so the settings, and
maybe starts the embedded Redis) only when it first needs it. The worker process's start-up
signal migrates the database and builds the runtime (event loop, HTTP client, engine), which the
harvest task reads from its base class; the shutdown signal closes it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from celery import Celery, signals

from core.celery_config import celery_config
from core.gc_tuning import freeze_long_lived_objects
from core.migrate import migrate
from core.settings import get_settings
from worker import kombu_fixes
from worker.runtime import WorkerRuntime
from worker.task import register

log = logging.getLogger(__name__)

app = Celery("worker", set_as_current=False)
# A promise: evaluated when Celery first reads its configuration, not at import.
app.add_defaults(lambda: celery_config(get_settings()))
harvest_page = register(app)


@signals.worker_init.connect
def _start_runtime(**_: Any) -> None:
    kombu_fixes.apply()
    # One INFO line per fetched page costs more than it tells; failures are logged by the task.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = get_settings()
    # Before the runtime's loop exists, so the migration's own loop never meets its connections.
    asyncio.run(migrate(settings.resolved_database_url))
    harvest_page.attach(WorkerRuntime(settings))
    log.info("worker runtime ready")


@signals.worker_ready.connect
def _freeze_startup_objects(**_: Any) -> None:
    freeze_long_lived_objects()


@signals.worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    runtime = harvest_page.detach()
    if runtime is not None:
        runtime.close()
        log.info("worker runtime closed")

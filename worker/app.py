"""The worker's Celery app: `celery -A worker.app worker` (see the README for the full line).

Importing this module builds nothing: Celery reads the configuration (and so the settings, and
maybe starts the embedded Redis) only when it first needs it. The worker process's start-up
signal migrates the database (once it answers: a worker may start before it) and builds the
runtime (event loop, HTTP client, engine), which the harvest task reads from its base class;
the shutdown signal closes it.

A worker started without `-n` is named `worker-<pid>@<host>`, not Celery's `celery@<host>`, so a
second worker on one host is a node of its own. The fixes to kombu and Celery that a worker
needs (`worker.kombu_fixes`) are applied at its start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import traceback
from typing import Any

import click
from celery import Celery, signals
from celery.utils.nodenames import nodename, nodesplit

from core import logs, tracing
from core.celery_config import celery_config
from core.events import events_url
from core.gc_tuning import freeze_long_lived_objects
from core.migrate import migrate_when_reachable
from core.settings import settings_or_exit
from core.waiting import LOG_EVERY_SECONDS
from worker import kombu_fixes
from worker import metrics as worker_metrics
from worker.page_tree import ProfileError
from worker.parse import check_profile
from worker.runtime import WorkerRuntime
from worker.task import register

log = logging.getLogger(__name__)

app = Celery("worker", set_as_current=False)
# A promise: evaluated when Celery first reads its configuration, not at import.
# A bad setting ends the command with one line per variable and exit status 2 (SystemExit passes
# through Celery's configuration loading and click).
app.add_defaults(lambda: celery_config(settings_or_exit()))
harvest_page = register(app)


@signals.celeryd_init.connect
def _unique_default_node_name(instance: Any, **_: Any) -> None:
    """`celery@<host>` unless `-n` was given; every such worker on a host would share it.
    (And no banner when the logs are JSON.)"""
    if settings_or_exit().log_format == "json":
        # Celery's banner is text on stdout: without it, every line out is a JSON object.
        instance.quiet = True
    context = click.get_current_context(silent=True)
    if context is None or context.command.name != "worker":
        return  # started by code, not by `celery worker`: its caller named it
    if context.get_parameter_source("hostname") is not click.core.ParameterSource.DEFAULT:
        return
    # The first signal of a worker: nothing has used its name yet but --pidfile/--statedb's %n.
    instance.hostname = nodename(f"worker-{os.getpid()}", nodesplit(instance.hostname)[1])


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    # Celery sets its handlers up (stderr or --logfile, --loglevel); LOG_FORMAT sets the format.
    logs.use_format(logger.handlers, settings_or_exit().log_format)


class _BrokerWaitLog(logging.Filter):
    """Celery's consumer logs each failed try to reach the broker (every few seconds while it
    waits): let the first through, then one a minute, until it connects again."""

    def __init__(self, every: float = LOG_EVERY_SECONDS) -> None:
        super().__init__()
        self._every = every
        self._logged_at: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("consumer: Cannot connect to"):
            if str(record.msg).startswith("Connected to"):
                self._logged_at = None  # the next outage is told at once
            return True
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self._every:
            return False
        self._logged_at = now
        return True


@signals.worker_init.connect
def _start_runtime_or_exit(**_: Any) -> None:
    try:
        _start_runtime()
    except Exception:
        # Celery logs what a worker_init handler raises (before its logging is set up, so
        # nowhere) and consumes anyway: every task would fail "the worker runtime is not
        # started". Said on stderr, and the worker does not start.
        traceback.print_exc(file=sys.stderr)
        print("the worker runtime could not start: the worker exits", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _start_runtime() -> None:
    kombu_fixes.apply()
    logging.getLogger("celery.worker.consumer.consumer").addFilter(_BrokerWaitLog())
    # One INFO line per fetched page costs more than it tells; failures are logged by the task.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = settings_or_exit()
    try:
        check_profile(settings.source_profile, settings.source_parser)
    except ProfileError as error:
        # As a bad setting: said once, and the worker does not start.
        print(error, file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    # Before the runtime's loop exists, so the migration's own loop never meets its connections.
    # A worker started before its database waits here (logging the wait once a minute), and so
    # does not consume until it can record what it runs.
    asyncio.run(
        migrate_when_reachable(settings.resolved_database_url, settings.dependency_timeout_seconds)
    )
    events = events_url(app.conf.broker_url, app.conf.result_backend)
    runtime = WorkerRuntime(settings, events)
    harvest_page.attach(runtime)
    if settings.worker_metrics_address is not None:
        worker_metrics.instrument(runtime.http)
    if tracing.configure(settings, "harvester-worker"):
        tracing.instrument_worker(runtime.http, runtime.engine)
    log.info("worker runtime ready")


@signals.worker_ready.connect
def _freeze_startup_objects(**_: Any) -> None:
    freeze_long_lived_objects()


@signals.worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    # At ready, not at init: Celery's logging is set up by then, so the address is logged.
    settings = settings_or_exit()
    if settings.worker_metrics_address is not None:
        worker_metrics.serve(app, settings.worker_metrics_address, settings.task_queue)


@signals.worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    runtime = harvest_page.detach()
    if runtime is not None:
        runtime.close()
        log.info("worker runtime closed")
    tracing.shutdown()

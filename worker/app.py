"""The worker's Celery app: `celery -A worker.app worker` (see the README for the full line).

Importing this module builds nothing: Celery reads the configuration (and so the settings, and
maybe starts the embedded Redis) only when it first needs it. The worker process's start-up
signal migrates the database and builds the runtime (event loop, HTTP client, engine), which the
harvest task reads from its base class; the shutdown signal closes it.

A worker started without `-n` is named `worker-<pid>@<host>`, not Celery's `celery@<host>`, so a
second worker on one host is a node of its own. A worker that lost its broker stops with one
line saying so, not with a traceback per consumer step.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import click
from celery import Celery, bootsteps, signals
from celery.utils.nodenames import nodename, nodesplit
from celery.worker import state as worker_state
from kombu.utils.url import maybe_sanitize_url

from core.celery_config import celery_config
from core.events import events_url
from core.gc_tuning import freeze_long_lived_objects
from core.migrate import migrate
from core.settings import settings_or_exit
from worker import kombu_fixes
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
    """`celery@<host>` unless `-n` was given; every such worker on a host would share it."""
    context = click.get_current_context(silent=True)
    if context is None or context.command.name != "worker":
        return  # started by code, not by `celery worker`: its caller named it
    if context.get_parameter_source("hostname") is not click.core.ParameterSource.DEFAULT:
        return
    # The first signal of a worker: nothing has used its name yet but --pidfile/--statedb's %n.
    instance.hostname = nodename(f"worker-{os.getpid()}", nodesplit(instance.hostname)[1])


def _close_without_connection(close: Any) -> Any:
    """ConsumerStep._close for a broker connection that is gone (kombu #582's class).

    Celery drops its connection when the broker goes; closing Gossip's consumers then called
    `ignore_errors(None, ...)`, whose AttributeError filled the log at every reconnect and,
    at shutdown, escaped as a traceback printed one logging line per write.
    """

    def _close(self: Any, c: Any, cancel_consumers: bool = True) -> None:
        if c.connection is not None:
            close(self, c, cancel_consumers)
            return
        self.consumers = None  # their channels went with the connection
        stopping = worker_state.should_stop is not None or worker_state.should_terminate is not None
        if stopping and not _said_broker_lost:
            _say_broker_lost(c)

    _close.patched = True  # type: ignore[attr-defined]
    return _close


_said_broker_lost = False


def _say_broker_lost(consumer: Any) -> None:
    global _said_broker_lost  # noqa: PLW0603 - once per process
    _said_broker_lost = True
    held = len(worker_state.reserved_requests)
    log.warning(
        "stopping without the broker (%s is unreachable): %s",
        maybe_sanitize_url(consumer.app.conf.broker_url),
        f"the {held} task(s) this worker held are delivered again after the visibility timeout"
        if held
        else "this worker held no task",
    )


@signals.worker_init.connect
def _start_runtime(**_: Any) -> None:
    kombu_fixes.apply()
    step: Any = bootsteps.ConsumerStep  # celery-types leaves out the private _close
    if not getattr(step._close, "patched", False):
        step._close = _close_without_connection(step._close)
    # One INFO line per fetched page costs more than it tells; failures are logged by the task.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = settings_or_exit()
    # Before the runtime's loop exists, so the migration's own loop never meets its connections.
    asyncio.run(migrate(settings.resolved_database_url))
    events = events_url(app.conf.broker_url, app.conf.result_backend)
    harvest_page.attach(WorkerRuntime(settings, events))
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

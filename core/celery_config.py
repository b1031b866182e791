"""The Celery configuration both sides share: broker, results, delivery guarantees, names.

The gateway and the worker each build their own `Celery` instance from this one function; the
gateway never imports the worker and enqueues by `HARVEST_TASK_NAME`.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from core import embedded_redis
from core.settings import Settings

log = logging.getLogger(__name__)

HARVEST_TASK_NAME = "projects.v1.harvest_page"

# Bounds how long one attempt to reach the broker or the result backend may block a thread.
SOCKET_CONNECT_TIMEOUT_SECONDS = 2.0
SOCKET_TIMEOUT_SECONDS = 10.0


def broker_and_backend(settings: Settings) -> tuple[str, str]:
    """The URLs to use, starting the embedded Redis when no broker is configured."""
    broker = settings.celery_broker_url
    if broker is None:
        broker = embedded_redis.ensure_running(settings.data_dir)
        # Fine on one machine; on many it means this process talks to nobody else.
        log.warning("CELERY_BROKER_URL is unset: using the embedded Redis at %s", broker)
    backend = settings.celery_result_backend or broker
    return broker, backend


def make_celery(settings: Settings, main: str, app_class: type[Celery] = Celery) -> Celery:
    """A configured app for a process that knows its settings now (the gateway)."""
    app = app_class(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration for `settings` (which may start the embedded Redis)."""
    broker, backend = broker_and_backend(settings)
    redis_options: dict[str, object] = {
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
    }
    if settings.redis_key_prefix:
        redis_options["global_keyprefix"] = settings.redis_key_prefix
    return {
        "broker_url": broker,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.task_queue,
        # At-least-once: a message is acked only after the task ran, and is handed back when
        # the process running it dies; storage is idempotent, so a second run is harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        # A message redelivered after its task already succeeded (it outlived the visibility
        # timeout) is skipped instead of run, and its SUCCESS left alone.
        "worker_deduplicate_successful_tasks": True,
        "task_soft_time_limit": settings.task_soft_time_limit_seconds,
        "task_time_limit": settings.task_time_limit_seconds,
        "result_expires": settings.result_expires_seconds,
        "broker_transport_options": {
            "visibility_timeout": settings.broker_visibility_timeout_seconds,
            # kombu sweeps for messages past their visibility timeout only every interval x
            # throttle seconds (100 s by default); a dead worker's tasks should come back soon
            # after the timeout, not minutes later.
            "unacked_restore_interval": max(
                1, min(10, settings.broker_visibility_timeout_seconds // 10)
            ),
            "unacked_restore_throttle": 1,
            **redis_options,
        },
        "broker_connection_timeout": SOCKET_CONNECT_TIMEOUT_SECONDS,
        "broker_connection_retry_on_startup": True,
        # A worker started before its broker, or whose broker is down, waits for it however
        # long that takes (Celery's default gives up after 100 tries) and then consumes.
        "broker_connection_max_retries": None,
        "redis_socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_SECONDS,
        "redis_socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "redis_retry_on_timeout": True,
        "result_backend_transport_options": {
            "retry_policy": {"timeout": 5.0},
            **(
                {"global_keyprefix": settings.redis_key_prefix} if settings.redis_key_prefix else {}
            ),
        },
        # One long-lived event loop per process serves a pool of threads (see worker.runtime),
        # so the pool and its size are part of the configuration, not only of the command line.
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_prefetch_multiplier": 1,
        # Task events (sent, received, started, succeeded, ...) for `celery events`, Flower and
        # other monitors; a sent event costs the gateway a message per task, in the same
        # pipeline as the task's own.
        "worker_send_task_events": settings.task_events,
        # Sends the buffered task events together, a few times a second (worker/consumer.py).
        "worker_consumer": "worker.consumer:Consumer",
        "task_send_sent_event": settings.task_events,
    }

"""Fixes to kombu's Redis transport and Celery's consumer and pool, applied when a worker starts.

- A broker blip must not kill the worker. When the broker connection drops while a task is
  held, kombu closes the channel and tries to hand the held messages back at once; the
  connection is already torn down by then, and `Channel._connparams` fails with AttributeError
  ('NoneType' has no attribute 'hostname', the class of kombu issues #582 and #970). Celery
  treats that as unrecoverable and the worker exits. Nothing is lost by not handing them back
  at that instant: they stay in Redis's unacked set and come back after the visibility
  timeout. So the failure is logged and the worker reconnects.
- A message must not cost a new Redis client. `Channel.conn_or_acquire` builds a client object
  for every call made without one (each delivery's unacked bookkeeping, each ack), and a
  redis-py client builds a table of some 200 response callbacks in its constructor, a visible
  share of a harvest worker's CPU (bench/README.md). A client holds no connection of its own (it
  borrows one from the channel's pool per command) and is safe to share between threads, so
  one per pool is kept and reused; a pool replaced after a disconnect gets a client of its own.
- A worker whose broker went away must stop in one line. Celery drops its connection when the
  broker goes, and closing its consumers then fails with an AttributeError (the same class of
  kombu #582), which at shutdown escaped as a traceback logged one line per write (~1,700
  lines): the consumers are dropped with the connection, and the loss is said once.
- A cold shutdown (SIGQUIT) must end the worker. Celery cancels the running tasks through
  their pool's `terminate_job`, which its thread pool does not have: NotImplementedError
  escaped from the signal handler into whatever the main thread was doing, and the shutdown
  ended with exit code 0, or not at all (celery/celery#10490). A thread cannot be killed; a
  task of ours ends when the worker's loops stop and cancel its work (`worker.runtime`), so
  the pool's `terminate_job` does nothing and the cold shutdown goes on as designed.
- Nor hang it. Celery runs the cold shutdown inside the SIGQUIT handler, in the main thread,
  which may be in the middle of handing a task to the thread pool (`ThreadPoolExecutor.submit`,
  which holds the executor's shutdown lock while it starts a thread); the handler's
  `pool.stop()` then waited for that same lock forever. The lock is made re-entrant, so the
  handler's shutdown goes through; the interrupted submit finds its work item cancelled.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from celery import bootsteps
from celery.concurrency import thread as celery_threads
from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis
from kombu.utils.url import maybe_sanitize_url

log = logging.getLogger(__name__)

_CACHED_CLIENT = "_harvester_client"


def _tolerate_closed_connection(restore: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(restore)
    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return restore(self, client)
        except AttributeError:
            log.warning(
                "broker connection gone: %d held message(s) come back after the visibility "
                "timeout instead of now",
                len(getattr(self, "_delivered", ())),
            )
            return None

    restore_unacked.patched = True  # type: ignore[attr-defined]
    return restore_unacked


@contextlib.contextmanager
def _conn_or_acquire(channel: Any, client: Any = None) -> Iterator[Any]:
    if client:
        yield client
        return
    pool = channel.pool
    cached = channel.__dict__.get(_CACHED_CLIENT)
    if cached is None or cached[0] is not pool:
        cached = (pool, channel._create_client())
        channel.__dict__[_CACHED_CLIENT] = cached
    yield cached[1]


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


def _threads_end_with_the_loops(self: Any, pid: Any, signal: Any = None) -> None:
    log.info("a running task ends when the worker's loops stop (threads cannot be killed)")


def _shutdown_lock_reentrant(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.executor._shutdown_lock = threading.RLock()

    __init__.patched = True  # type: ignore[attr-defined]
    return __init__


def apply() -> None:
    thread_pool: Any = celery_threads.TaskPool
    thread_pool.terminate_job = _threads_end_with_the_loops
    if not getattr(thread_pool.__init__, "patched", False):
        thread_pool.__init__ = _shutdown_lock_reentrant(thread_pool.__init__)
    step: Any = bootsteps.ConsumerStep  # celery-types leaves out the private _close
    if not getattr(step._close, "patched", False):
        step._close = _close_without_connection(step._close)
    qos = kombu_redis.QoS
    if not getattr(qos.restore_unacked, "patched", False):
        qos.restore_unacked = _tolerate_closed_connection(qos.restore_unacked)  # type: ignore[method-assign]
    kombu_redis.Channel.conn_or_acquire = _conn_or_acquire  # type: ignore[method-assign,assignment]

"""Two fixes to kombu's Redis transport, applied when the worker app is imported.

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
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from kombu.transport import redis as kombu_redis

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


def apply() -> None:
    qos = kombu_redis.QoS
    if not getattr(qos.restore_unacked, "patched", False):
        qos.restore_unacked = _tolerate_closed_connection(qos.restore_unacked)  # type: ignore[method-assign]
    kombu_redis.Channel.conn_or_acquire = _conn_or_acquire  # type: ignore[method-assign,assignment]

"""A workaround for a kombu Redis-transport bug that kills the worker on a broker blip.

When the broker connection drops while a task is held, kombu closes the channel and tries to
hand the held messages back at once; the connection is already torn down by then, and
`Channel._connparams` fails with AttributeError ('NoneType' has no attribute 'hostname', the
class of kombu issues #582 and #970). Celery treats that as unrecoverable and the worker exits.
Nothing is lost by not handing them back at that instant: they stay in Redis's unacked set and
come back after the visibility timeout. So the failure is logged and the worker reconnects.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


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


def apply() -> None:
    qos = kombu_redis.QoS
    if not getattr(qos.restore_unacked, "patched", False):
        qos.restore_unacked = _tolerate_closed_connection(qos.restore_unacked)  # type: ignore[method-assign]

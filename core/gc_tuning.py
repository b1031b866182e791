"""Keep the cyclic garbage collector off the objects a process keeps for its whole life.

A started gateway or worker holds well over 100,000 long-lived objects: modules, Celery,
kombu, SQLAlchemy and grpc machinery. Every full collection walked all of them again; in a
harvest worker those collections came to about a fifth of its CPU (measured with gc.callbacks
under `make bench`). `gc.freeze()` moves what is alive at that moment into a generation the
collector never scans; what is made later is collected as usual.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_long_lived_objects() -> None:
    """Call once a process is set up (and again after a large lasting setup step)."""
    gc.freeze()
    log.debug("%d objects moved out of the garbage collector's scans", gc.get_freeze_count())

"""Keep the cyclic garbage collector off the objects a process keeps for its whole life.

A started gateway or worker holds well over 100,000 long-lived objects: modules, Celery,
kombu, SQLAlchemy and grpc machinery. Every full collection walked all of them again, a large
share of a harvest worker's CPU (bench/README.md). `gc.freeze()` moves what is alive at that
moment into a generation the collector never scans; what is made later is collected as usual.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


def freeze_long_lived_objects() -> None:
    """Call once a process is set up (and again after a large lasting setup step)."""
    gc.freeze()
    log.debug("%d objects moved out of the garbage collector's scans", gc.get_freeze_count())


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection while the block runs; for a burst of short-lived allocations.

    Building a parse tree allocates thousands of objects that all die together when the tree
    is taken apart; the collector would scan them several times on the way. A thread that finds
    the collector already paused leaves it to the one that paused it.
    """
    pause = gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if pause:
            gc.enable()

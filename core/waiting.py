"""Wait for a dependency at start-up: try again with backoff, and say what is awaited without
flooding the log.

A gateway or worker started before its database (or whose database is down) must neither die
nor write a line per attempt: `until_done` retries an attempt while it fails in a way that may
pass (`passes`), with a growing pause, logging the wait once and then at most once a minute,
and the recovery once. A failure that will not pass by waiting (a wrong password, a migration
that fails) is raised at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_PAUSE_SECONDS = 0.5
LONGEST_PAUSE_SECONDS = 5.0
LOG_EVERY_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float = FIRST_PAUSE_SECONDS
    longest: float = LONGEST_PAUSE_SECONDS
    log_every: float = LOG_EVERY_SECONDS

    def pause(self, failures: int) -> float:
        """The pause after the `failures`-th failure in a row (1 for the first)."""
        return float(min(self.longest, self.first * 2 ** (failures - 1)))


DEFAULT_BACKOFF = Backoff()


async def until_done(
    attempt: Callable[[], Awaitable[T]],
    what: str,
    passes: Callable[[BaseException], bool],
    *,
    backoff: Backoff = DEFAULT_BACKOFF,
    on_failure: Callable[[BaseException], None] = lambda _exc: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """`attempt()`'s result, once it succeeds; `what` names what is awaited in the log.

    `on_failure` hears each failure that may pass (for a caller that shows it meanwhile, e.g. in
    its UNAVAILABLE answers).
    """
    failures = 0
    logged_at: float | None = None
    while True:
        try:
            result = await attempt()
        except Exception as exc:
            if not passes(exc):
                raise
            failures += 1
            on_failure(exc)
            now = clock()
            if logged_at is None or now - logged_at >= backoff.log_every:
                log.warning(
                    "waiting for %s (%s: %s); trying again%s",
                    what,
                    type(exc).__name__,
                    exc,
                    "" if logged_at is None else f" ({failures} tries so far)",
                )
                logged_at = now
            await sleep(backoff.pause(failures))
            continue
        if failures:
            log.info("%s answered after %d failed tries", what, failures)
        return result

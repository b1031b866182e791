"""When the client tries a call again, and how long it waits first: policy as data.

A call is tried again only when trying again cannot do harm: UNAVAILABLE (the gateway, or the
broker or database behind it, did not take the request), RESOURCE_EXHAUSTED with a RetryInfo
(the gateway said when to come back), and DEADLINE_EXCEEDED for calls that are safe to repeat
(reads, and uploads, which carry a request_id the client made, so a repeat returns the task the
first try made instead of enqueuing another). The waits grow exponentially, with jitter, so
that many clients cut off together do not come back together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from harvester.errors import HarvesterError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many tries, and the waits between them: `initial_backoff` doubling up to
    `max_backoff`, each wait drawn between half of it and all of it."""

    max_attempts: int = 6
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def should_retry(self, error: HarvesterError, attempt: int, *, repeatable: bool) -> bool:
        """Whether to try again after `error` ended try number `attempt` (1-based)."""
        if attempt >= self.max_attempts:
            return False
        if error.code == grpc.StatusCode.UNAVAILABLE:
            return True
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return error.retry_delay is not None
        return error.code == grpc.StatusCode.DEADLINE_EXCEEDED and repeatable

    def backoff(self, attempt: int, error: HarvesterError | None = None) -> float:
        """Seconds to wait after try number `attempt`; at least what the gateway asked for."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        wait = ceiling / 2 + random.uniform(0, ceiling / 2)
        if error is not None and error.retry_delay is not None:
            wait = max(wait, error.retry_delay)
        return wait


# Unary calls: a few quick tries (about 3 s of waiting in all) before the error reaches you.
DEFAULT_RETRY = RetryPolicy()
# Streams that follow something for long (watch_projects, wait): reconnect for about a minute
# of consecutive failures, long enough for a gateway to restart; a message received resets it.
DEFAULT_RECONNECT = RetryPolicy(max_attempts=20, initial_backoff=0.1, max_backoff=5.0)

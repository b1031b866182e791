"""A token bucket per client: GATEWAY_RATE_LIMIT_PER_SECOND, bursts of GATEWAY_RATE_LIMIT_BURST.

Kept in process memory, so each gateway instance limits on its own; the bound on memory is one
small bucket per client name in API_TOKENS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_second: float, burst: int) -> None:
        self._rate = per_second
        self._burst = float(burst)
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def acquire(self, client: str) -> float:
        """0 when the call may go ahead; otherwise the seconds until it could."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        bucket = self._buckets.setdefault(client, _Bucket(self._burst, now))
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self._rate

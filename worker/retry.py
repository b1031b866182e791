"""Retry policy as data: how many tries, and how long to wait before each."""

from __future__ import annotations

import random
from dataclasses import dataclass

from core.settings import Settings


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_tries: int
    base_delay: float
    max_delay: float
    retry_after_cap: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_tries=settings.retry_max_tries,
            base_delay=settings.retry_base_delay_seconds,
            max_delay=settings.retry_max_delay_seconds,
            retry_after_cap=settings.retry_after_cap_seconds,
        )

    def can_retry(self, tries_done: int) -> bool:
        return tries_done < self.max_tries

    def delay(self, tries_done: int, retry_after: float | None = None) -> float:
        """Seconds to wait after `tries_done` failed tries (1 after the first failure).

        The source's Retry-After wins, up to the cap; otherwise exponential backoff with
        "equal jitter": half the step is fixed, half random, so workers that failed together
        do not all come back together.
        """
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        # The exponent is bounded first: 2.0 ** 1024 overflows, and the cap is long reached.
        step = min(self.max_delay, self.base_delay * 2.0 ** min(max(tries_done - 1, 0), 64))
        return step / 2 + random.uniform(0, step / 2)

"""The worker's errors; foreign ones (httpx, SQLAlchemy) are translated into these where raised.

HarvestError
 ├── RetryableError   5xx, 429, timeouts, connection loss, a locked or deadlocked database:
 │                    Celery tries the task again later (retry_after, when the source said)
 ├── PermanentError   other 4xx, an oversized or non-HTML page, a refused redirect, a task
 │                    that killed its worker too often: the task fails at once, saying why
 └── Cancelled        CancelTask or CancelBatch asked for it: the task ends REVOKED
"""

from __future__ import annotations


class HarvestError(Exception):
    """A harvest could not finish; the message says why, in words for a person."""


class RetryableError(HarvestError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(HarvestError):
    pass


class Cancelled(HarvestError):
    pass

"""The gateway's one boundary to the database's failures: a call that finds it unreachable.

Database outages leave the gateway's stores (`gateway.records`, `gateway.project_store`) as
`StoreUnavailable`, after telling `on_unavailable` (the gateway's health); a transaction the
database gave up for a concurrent one (a deadlock) leaves as `StoreContended`, without: the
database answered, and a gateway that reported itself down for it would be drained for
nothing. Anything else is a bug and is not disguised as one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.db import is_contention, is_transient
from gateway.errors import StoreContended, StoreUnavailable
from gateway.health import OnUnavailable

T = TypeVar("T")

CONTENDED_ATTEMPTS = 3
CONTENDED_BACKOFF_SECONDS = 0.02


@contextlib.asynccontextmanager
async def store_errors(on_unavailable: OnUnavailable) -> AsyncIterator[None]:
    """A database outage inside the block as StoreUnavailable, told to `on_unavailable` first."""
    try:
        yield
    except DBAPIError as exc:
        if not is_transient(exc):
            raise
        if is_contention(exc):
            raise StoreContended(str(exc.orig)) from exc
        await on_unavailable()
        raise StoreUnavailable(str(exc)) from exc
    except (PoolTimeout, OSError) as exc:
        await on_unavailable()
        raise StoreUnavailable(str(exc)) from exc


async def retry_contended(work: Callable[[], Awaitable[T]]) -> T:
    """`work()` (one transaction, safe to run again), run again when the database gave it up for
    a concurrent one, at most CONTENDED_ATTEMPTS times in all."""
    for attempt in range(1, CONTENDED_ATTEMPTS + 1):
        try:
            return await work()
        except StoreContended:
            if attempt == CONTENDED_ATTEMPTS:
                raise
            await asyncio.sleep(CONTENDED_BACKOFF_SECONDS * attempt)
    raise AssertionError("unreachable")  # pragma: no cover

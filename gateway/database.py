"""The gateway's one boundary to the database's failures: a call that finds it unreachable.

Database outages leave the gateway's stores (`gateway.records`, `gateway.project_store`) as
`StoreUnavailable`, after telling `on_unavailable` (the gateway's health); anything else is a
bug and is not disguised as one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.db import is_transient
from gateway.errors import StoreUnavailable
from gateway.health import OnUnavailable


@contextlib.asynccontextmanager
async def store_errors(on_unavailable: OnUnavailable) -> AsyncIterator[None]:
    """A database outage inside the block as StoreUnavailable, told to `on_unavailable` first."""
    try:
        yield
    except DBAPIError as exc:
        if not is_transient(exc):
            raise
        await on_unavailable()
        raise StoreUnavailable(str(exc)) from exc
    except (PoolTimeout, OSError) as exc:
        await on_unavailable()
        raise StoreUnavailable(str(exc)) from exc

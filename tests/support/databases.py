"""An engine on a test's database, migrated to head, disposed of at the end."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import create_engine
from core.migrate import upgrade_to_head


@contextlib.asynccontextmanager
async def engine_for(url: str, *, migrate: bool = True) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url)
    try:
        if migrate:
            await upgrade_to_head(engine)
        yield engine
    finally:
        await engine.dispose()

"""The gateway's task records on a real PostgreSQL that refuses connections.

Every database failure that a retry may cure must leave `TaskRecords` as `StoreUnavailable`
(UNAVAILABLE to the caller), never as an unexpected exception (INTERNAL).
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from core.db import create_engine
from core.migrate import upgrade_to_head
from gateway.errors import StoreUnavailable
from gateway.records import IssuedTask, TaskRecords

pytestmark = pytest.mark.postgres


async def test_too_many_clients_is_store_unavailable_for_every_kind_of_call(
    postgres_url: str, refused_postgres_url: str
) -> None:
    admin = create_engine(postgres_url)
    try:
        await upgrade_to_head(admin)
    finally:
        await admin.dispose()
    engine = create_engine(refused_postgres_url)
    records = TaskRecords(engine, dt.timedelta(hours=1))
    try:
        with pytest.raises(StoreUnavailable, match="too many"):
            await records.add_many([IssuedTask.new("alice", None, 1)])
        with pytest.raises(StoreUnavailable, match="too many"):
            await records.claim("alice", "request-1", 1)
        with pytest.raises(StoreUnavailable, match="too many"):
            await records.get("alice", str(uuid.uuid4()))
        assert await records.ping() is False
    finally:
        await engine.dispose()

"""worker.runtime: a process's database connections come from WORKER_DB_CONNECTIONS."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from core.migrate import upgrade_to_head
from core.settings import Settings
from worker import runtime as runtime_module
from worker.errors import RetryableError
from worker.runtime import WorkerRuntime
from worker.store import record_start


def test_tasks_share_worker_db_connections_and_wait_a_bounded_time_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wait = 0.3
    monkeypatch.setattr(runtime_module, "POOL_WAIT_SECONDS", wait)  # 5 s in production
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'projects.db'}",
        source_url="http://127.0.0.1:9/projects?page={page}",
        worker_concurrency=16,
        worker_db_connections=2,
    )
    # No event is published here: nothing connects to this Redis.
    runtime = WorkerRuntime(settings, "redis://127.0.0.1:9/0")
    try:
        runtime.run(upgrade_to_head(runtime.engine))

        # Sixteen task starts at once, as sixteen task threads would make them: two connections.
        async def sixteen_starts() -> list[int]:
            return list(
                await asyncio.gather(
                    *(record_start(runtime.engine, str(uuid.uuid4())) for _ in range(16))
                )
            )

        starts = runtime.run(sixteen_starts())
        assert starts == [0] * 16
        pool = runtime.engine.pool
        assert pool.checkedin() == 2  # type: ignore[attr-defined]

        async def with_every_connection_held() -> float:
            async with runtime.engine.connect(), runtime.engine.connect():
                started = time.monotonic()
                with pytest.raises(RetryableError):
                    await record_start(runtime.engine, str(uuid.uuid4()))
                return time.monotonic() - started

        waited = runtime.run(with_every_connection_held())
        # Three tries of POOL_WAIT_SECONDS each, then the task is retried by Celery.
        assert 3 * wait <= waited < 3 * wait + 2
    finally:
        runtime.close()

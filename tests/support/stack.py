"""A test's whole service: site, broker, database, gateway and workers, wired by environment.

`Stack` holds the environment every process of one test shares (its own data directory, queue
and key prefix, database, broker) and starts gateways and workers on it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import func, select

from core.db import Project, TaskRecord, create_engine
from projects.v1 import queue_service_pb2, task_pb2
from tests.support.processes import Gateway, Process, Site, poll_until, start_gateway, start_worker

TERMINAL = {
    task_pb2.TASK_STATUS_SUCCESS,
    task_pb2.TASK_STATUS_FAILURE,
    task_pb2.TASK_STATUS_REVOKED,
}
TEST_TOKEN = "test-token-" + uuid.uuid4().hex
OTHER_TOKEN = "other-token-" + uuid.uuid4().hex


def base_environment(directory: Path, site: Site) -> dict[str, str]:
    run = uuid.uuid4().hex[:12]
    return {
        "DATA_DIR": str(directory / "data"),
        "SOURCE_URL": site.source_url,
        "API_TOKENS": f"tester:{TEST_TOKEN},other:{OTHER_TOKEN}",
        "GATEWAY_ADDRESS": "127.0.0.1:0",
        "TASK_QUEUE": f"harvest-{run}",
        "REDIS_KEY_PREFIX": f"test-{run}:",
        "RETRY_BASE_DELAY_SECONDS": "0.2",
        "RETRY_MAX_DELAY_SECONDS": "1",
        "RETRY_AFTER_CAP_SECONDS": "5",
        "BROKER_CHECK_INTERVAL_SECONDS": "0.5",
        # The tests' own site needs no protecting: only the politeness tests set a real budget
        # (the budget's script still runs before every request).
        "SOURCE_MAX_REQUESTS_PER_SECOND": "10000",
        "SOURCE_MAX_CONCURRENCY": "1000",
        "LOG_LEVEL": "INFO",
    }


@dataclass
class Stack:
    directory: Path
    env: dict[str, str]
    site: Site
    processes: list[Process] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)

    def start_gateway(self, name: str = "gateway", ready: bool = True, **extra: str) -> Gateway:
        """A gateway serving; with `ready`, once it has migrated and serves calls (a gateway
        opens its port before it has reached its database)."""
        process = start_gateway(self.directory, {**self.env, **extra}, name)
        self.processes.append(process)
        address = process.wait_for_line(r"gateway listening on (\S+)").group(1)
        if ready:
            process.wait_for_line(r"gateway ready")
        gateway = Gateway(process, address, TEST_TOKEN)
        self.gateways.append(gateway)
        return gateway

    def start_worker(
        self,
        name: str = "worker",
        concurrency: int = 4,
        options: Sequence[str] = (),
        **extra: str,
    ) -> Process:
        """A worker, once it consumes; `options` are more of its command line."""
        process = self.launch_worker(name, concurrency, options, **extra)
        process.wait_for_line(r"ready\.")
        return process

    def launch_worker(
        self,
        name: str = "worker",
        concurrency: int = 4,
        options: Sequence[str] = (),
        **extra: str,
    ) -> Process:
        """A worker, at once: it may be waiting for its database or broker."""
        process = start_worker(
            self.directory, {**self.env, **extra}, name, concurrency, False, options
        )
        self.processes.append(process)
        return process

    def close(self) -> None:
        while self.gateways:
            self.gateways.pop().channel.close()
        for process in reversed(self.processes):
            process.stop()

    def logs(self) -> str:
        return "\n\n".join(f"===== {p.name} =====\n{p.output()}" for p in self.processes)

    # --- the database, as the tests see it ---

    def _run(self, query: Any) -> Any:
        async def run() -> Any:
            engine = create_engine(self.database_url)
            try:
                async with engine.connect() as conn:
                    return (await conn.execute(query)).all()
            finally:
                await engine.dispose()

        return asyncio.run(run())

    @property
    def database_url(self) -> str:
        return self.env.get("DATABASE_URL") or (
            f"sqlite+aiosqlite:///{Path(self.env['DATA_DIR']).resolve() / 'projects.db'}"
        )

    def projects(self) -> dict[str, Any]:
        rows = self._run(select(Project).order_by(Project.url))
        return {row.url: row for row in rows}

    def tasks_finished(self, request_id_prefix: str) -> int:
        """Tasks whose request_id starts with the prefix that have reached a final state."""
        rows = self._run(
            select(func.count())
            .select_from(TaskRecord)
            .where(
                TaskRecord.request_id.startswith(request_id_prefix, autoescape=True),
                TaskRecord.finished_at.is_not(None),
            )
        )
        return int(rows[0][0])

    def row_counts(self) -> tuple[int, int]:
        """(rows, distinct links) in `projects`."""
        rows = self._run(select(func.count(), func.count(Project.url.distinct())))
        return int(rows[0][0]), int(rows[0][1])


def upload(
    gateway: Gateway, page: int, request_id: str = "", token: str = TEST_TOKEN
) -> task_pb2.Task:
    response = gateway.stub.Upload(
        queue_service_pb2.UploadRequest(page=page, request_id=request_id),
        metadata=(("authorization", f"Bearer {token}"),),
        timeout=10,
    )
    return response.task


def get_status(gateway: Gateway, task_id: str, token: str = TEST_TOKEN) -> task_pb2.Task:
    response = gateway.stub.GetStatus(
        queue_service_pb2.GetStatusRequest(id=task_id),
        metadata=(("authorization", f"Bearer {token}"),),
        timeout=10,
    )
    return response.task


def wait_for_task(gateway: Gateway, task_id: str, timeout: float = 60.0) -> task_pb2.Task:
    def finished() -> task_pb2.Task | None:
        task = get_status(gateway, task_id)
        return task if task.status in TERMINAL else None

    result: task_pb2.Task = poll_until(finished, timeout, 0.05, f"task {task_id} to finish")
    return result


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


def wait_for_health(address: str, status: int, timeout: float = 30.0) -> None:
    poll_until(lambda: health_status(address) == status, timeout, 0.1, f"health {status}")


Detail = TypeVar("Detail", bound=Message)


def rpc_detail(error: grpc.RpcError, kind: type[Detail]) -> Detail:
    """The google.rpc detail of type `kind` that an error carries (AssertionError if none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status in {error}"
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            found = kind()
            packed.Unpack(found)
            return found
    raise AssertionError(f"no {kind.DESCRIPTOR.name} detail in {status}")

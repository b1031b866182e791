"""`list_projects_rows_per_s`: page through 100,000 projects, 1,000 a page, newest first.

One fresh PostgreSQL database, migrated, holds 100,000 projects stored by the worker's own
`worker.store.store_projects` (batches of 1,000, each its own transaction stamping a feed
revision, so the rows of a batch share one `updated_at`: the keyset's id tie-breaker is
exercised), then ANALYZEd.

- ours: a real `python -m gateway` on that database and a grpc.aio client in this process
  calling ListProjects (order_by "update_time desc", page_size 1000) from the first page until
  next_page_token is empty;
- baseline: asyncpg in this process, on one connection, the same columns in the same order by
  the keyset `SELECT ... WHERE (updated_at, id) < ($1, $2) ORDER BY updated_at DESC, id DESC
  LIMIT 1000` in a loop (the first page without the WHERE): the floor of a Python reader.

Each side is timed on the wall clock for the whole table and must return every row exactly
once (checked after the clock stops); the figure is rows per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil

from bench.common import Options, interleaved, say
from bench.report import Figure, median
from bench.services import environment, gateway, postgres_database, redis_namespace
from core.db import create_engine
from core.migrate import upgrade_to_head
from projects.v1 import project_service_pb2, project_service_pb2_grpc
from sample_site.pages import sample_project
from tests.support.stack import TEST_TOKEN
from worker.parse import ProjectItem
from worker.store import store_projects

ROWS = 100_000
PAGE_SIZE = 1000
# Items per store_projects call and per batch (transaction) within it, as a worker stores them.
FILL_CHUNK = 10_000
FILL_BATCH = 1000
ORDER_BY = "update_time desc"
METADATA = (("authorization", f"Bearer {TEST_TOKEN}"),)
# The gateway's columns (gateway.project_store.COLUMNS), in its order.
COLUMNS = (
    "id, url, title, description, is_active, start_date, first_seen_at, updated_at, "
    "last_seen_at, revision, start_sort"
)
FIRST_PAGE = f"SELECT {COLUMNS} FROM projects ORDER BY updated_at DESC, id DESC LIMIT {PAGE_SIZE}"
NEXT_PAGE = (
    f"SELECT {COLUMNS} FROM projects WHERE (updated_at, id) < ($1, $2) "
    f"ORDER BY updated_at DESC, id DESC LIMIT {PAGE_SIZE}"
)


def item(number: int) -> ProjectItem:
    """Project `number` as a listing shows it (the sample site's made-up data)."""
    sample = sample_project(number)
    return ProjectItem(
        url=f"https://projects.example.org/p/{number}",
        title=sample.title,
        description=sample.description,
        is_active=sample.is_active,
        start_date=sample.start_date,
    )


async def _fill(database_url: str, rows: int) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade_to_head(engine)
        started = time.perf_counter()
        for first in range(1, rows + 1, FILL_CHUNK):
            chunk = [item(n) for n in range(first, min(first + FILL_CHUNK, rows + 1))]
            counts = await store_projects(engine, chunk, FILL_BATCH)
            assert counts.created == len(chunk), counts
        seconds = time.perf_counter() - started
        say(f"  stored {rows:,} projects with store_projects in {seconds:.1f} s")
    finally:
        await engine.dispose()
    conn = await asyncpg.connect(_dsn(database_url))
    try:
        await conn.execute("ANALYZE projects")
        stored = await conn.fetchval("SELECT count(*) FROM projects WHERE revision > 0")
        assert stored == rows, stored
    finally:
        await conn.close()


def _dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _exact(ids: list[int], rows: int, who: str) -> None:
    if len(ids) != rows or len(set(ids)) != rows:
        raise AssertionError(f"{who}: {len(ids)} rows, {len(set(ids))} distinct, not {rows}")


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` so far, every thread's, to the nanosecond where the kernel
    says it (/proc/PID/task/TID/schedstat); psutil's clock ticks (10 ms) elsewhere."""
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system


class _Ours:
    """ListProjects through the gateway, page after page."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, address: str, rows: int, gateway_pid: int
    ) -> None:
        self.loop = loop
        self.rows = rows
        self.gateway_pid = gateway_pid
        # Per run: the gateway's CPU and this process's (the client's), microseconds a row.
        self.gateway_cpu: list[float] = []
        self.client_cpu: list[float] = []
        self.channel = loop.run_until_complete(self._connect(address))
        self.stub = project_service_pb2_grpc.ProjectServiceStub(self.channel)

    @staticmethod
    async def _connect(address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
        )

    async def _pages(self) -> tuple[float, list[project_service_pb2.ListProjectsResponse]]:
        pages = []
        token = ""
        started = time.perf_counter()
        while True:
            request = project_service_pb2.ListProjectsRequest(
                page_size=PAGE_SIZE, order_by=ORDER_BY, page_token=token
            )
            page = await self.stub.ListProjects(request, metadata=METADATA, timeout=60)
            pages.append(page)
            token = page.next_page_token
            if not token:
                break
        return time.perf_counter() - started, pages

    def run(self) -> float:
        gateway_cpu = process_cpu_seconds(self.gateway_pid)
        client_cpu = time.process_time()
        seconds, pages = self.loop.run_until_complete(self._pages())
        self.client_cpu.append((time.process_time() - client_cpu) / self.rows * 1e6)
        self.gateway_cpu.append(
            (process_cpu_seconds(self.gateway_pid) - gateway_cpu) / self.rows * 1e6
        )
        _exact([p.id for page in pages for p in page.projects], self.rows, "ours")
        return self.rows / seconds

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close(None))


class _Baseline:
    """The keyset SELECT on asyncpg, in a loop, on one connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, database_url: str, rows: int) -> None:
        self.loop = loop
        self.rows = rows
        self.client_cpu: list[float] = []  # this process's CPU per run, microseconds a row
        self.conn: asyncpg.Connection[Any] = loop.run_until_complete(
            asyncpg.connect(_dsn(database_url))
        )

    async def _pages(self) -> tuple[float, list[list[asyncpg.Record]]]:
        pages = []
        started = time.perf_counter()
        page = await self.conn.fetch(FIRST_PAGE)
        while page:
            pages.append(page)
            if len(page) < PAGE_SIZE:
                break
            last = page[-1]
            page = await self.conn.fetch(NEXT_PAGE, last["updated_at"], last["id"])
        return time.perf_counter() - started, pages

    def run(self) -> float:
        client_cpu = time.process_time()
        seconds, pages = self.loop.run_until_complete(self._pages())
        self.client_cpu.append((time.process_time() - client_cpu) / self.rows * 1e6)
        _exact([row["id"] for page in pages for row in page], self.rows, "baseline")
        return self.rows / seconds

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())


def run(options: Options) -> list[Figure]:
    rows = ROWS // 5 if options.quick else ROWS
    loop = asyncio.new_event_loop()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-list-projects-") as name,
            redis_namespace() as (redis_url, prefix),
            postgres_database() as database_url,
        ):
            say(f"list_projects: {rows:,} projects, pages of {PAGE_SIZE}, {ORDER_BY!r}")
            loop.run_until_complete(_fill(database_url, rows))
            env = environment(Path(name), redis_url, prefix, database_url)
            with gateway(Path(name), env) as (process, address):
                ours = _Ours(loop, address, rows, process.pid)
                base = _Baseline(loop, database_url, rows)
                try:
                    samples = interleaved(
                        options.runs, {"ours": ours.run, "asyncpg keyset loop": base.run}
                    )
                finally:
                    ours.close()
                    base.close()
    finally:
        loop.close()
    baseline = samples.pop("asyncpg keyset loop")
    samples["baseline"] = baseline
    # The warm-up's CPU is left out, as its rate is.
    samples["ours_gateway_cpu_us_per_row"] = ours.gateway_cpu[1:]
    samples["ours_client_cpu_us_per_row"] = ours.client_cpu[1:]
    samples["baseline_cpu_us_per_row"] = base.client_cpu[1:]
    return [
        Figure(
            "list_projects_rows_per_s",
            median(samples["ours"]),
            median(baseline),
            "rows/s",
            higher_is_better=True,
            target=0.3,
            note=(
                f"{rows:,} rows, ListProjects page_size {PAGE_SIZE} {ORDER_BY!r} through the "
                "gateway vs a keyset SELECT loop on asyncpg in one process, rows exact on both; "
                f"CPU a row: the gateway {median(ours.gateway_cpu[1:]):.1f} us and its client "
                f"{median(ours.client_cpu[1:]):.1f} us, the asyncpg loop "
                f"{median(base.client_cpu[1:]):.1f} us"
            ),
            samples=samples,
        )
    ]

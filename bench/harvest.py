"""`harvest_pages_per_s`: end to end, Upload to SUCCESS, from a site that takes 250 ms a page.

Both sides harvest listing pages of 100 items from the scriptable sample site, every answer held
back 250 ms (a remote site is slow), into one fresh PostgreSQL database through the machine's
Redis, with 2 worker processes each:

- ours: `python -m gateway` and 2 `celery -A worker.app worker` processes (threads sharing one
  event loop per process, WORKER_CONCURRENCY tasks in flight each); 400 pages are Uploaded
  through the gateway, and the run ends at the last task's finish time as GetStatus reports it;
- ours with lxml: the same with `SOURCE_PARSER=lxml`: the same gateway, and 2 workers started
  with that setting in place of the others (only one set runs at a time: both at once, idle
  or not, held more database connections than a shared PostgreSQL's 100 allowed);
- Scrapy, the peer a user would pick instead (`harvest_vs_scrapy`): the same pages from the same
  site by `bench/scrapy_peer.py`'s spider (the same selectors through parsel, a pipeline
  upserting 100 items a batch into the same database), as 2 processes splitting the pages, one
  per core; our workers stopped meanwhile. The run is from the earlier process's first request
  to the later one's last commit. Left out, said on stderr, where Scrapy is not installed;
- baseline: `celery -A bench.baseline_worker worker --pool prefork --concurrency 2`, the
  original design (see bench/baseline_worker.py), driven by `.delay()`; it ends at the last
  task's `date_done`.

Each run starts from an empty table and must end with rows == distinct links == pages * 100.
Beside it, `harvest_vs_cpu_floor` compares ours with what the machine could do at most: its
cores divided by the CPU seconds one page costs to parse and store, measured alone (this
process's CPU and the PostgreSQL server process's that stores the page); and
`harvest_vs_cpu_floor_lxml` the same for ours with lxml and a page parsed by lxml.
That measurement takes its turn between the runs of both sides, because this machine's speed
drifts by tens of percent within minutes: a floor read once, before the runs, was 35 ms a
page in one run and 56 ms in the next.

`harvest_cpu_per_page` and `harvest_cpu_per_page_lxml` say where a run of ours spends the
machine: the CPU seconds, per page, of every process a harvest runs on (the workers, the
gateway, the PostgreSQL and Redis servers, the site, this process), summed over each run,
against the floor's CPU a page. A rate short of its floor is either CPU spent beyond the
page's parse and store (this figure says how much, and where) or cores left idle (this figure
does not move).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import redis
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench import data
from bench.baseline_worker import Base, BaselineProject, make_app
from bench.common import Options, interleaved, say
from bench.report import Figure, median
from bench.services import environment, gateway, postgres_database, redis_namespace
from core.db import Project, create_engine
from core.settings import Settings, SourceParser
from projects.v1 import queue_service_pb2, queue_service_pb2_grpc, task_pb2
from tests.support.processes import BIN, PYTHON, Process, Site, clean_environment, start_site
from tests.support.stack import TEST_TOKEN
from worker.parse import parse_listing
from worker.store import store_projects

ITEMS_PER_PAGE = 100
SITE_DELAY_SECONDS = 0.25
OUR_PAGES = 400
BASELINE_PAGES = 48
# Pages parsed and stored alone per turn of the CPU floor; their mean is that turn's sample.
FLOOR_PAGES = 20
# The first page of each parser's floor: links of their own, new on every turn.
FLOOR_FIRST_PAGE: dict[SourceParser, int] = {"beautifulsoup": 5001, "lxml": 6001}
WORKERS = 2
# Tasks in flight per worker process: the setting's default, which is what this bench found best.
WORKER_CONCURRENCY: int = Settings.model_fields["worker_concurrency"].default
UPLOAD_CLIENTS = 16
RUN_TIMEOUT_SECONDS = 240.0
METADATA = (("authorization", f"Bearer {TEST_TOKEN}"),)


@dataclass
class _Pages:
    """The site's answers: every page once, 250 ms late, scripted anew before each run."""

    site: Site
    bodies: dict[int, str]

    def script(self, pages: Sequence[int]) -> None:
        with httpx.Client(base_url=self.site.url, timeout=30) as client:
            client.post("/_control/reset").raise_for_status()
            for page in pages:
                response = {
                    "status": 200,
                    "headers": {"Content-Type": "text/html; charset=utf-8"},
                    "body": self.bodies[page],
                    "delay": SITE_DELAY_SECONDS,
                }
                client.post(
                    "/_control/script", json={"page": page, "responses": [response]}
                ).raise_for_status()


async def _rows(engine: AsyncEngine, table: Any) -> tuple[int, int]:
    """(rows, distinct links) in `table`."""
    async with engine.connect() as conn:
        result = (await conn.execute(select(func.count(), func.count(table.url.distinct())))).one()
    return int(result[0]), int(result[1])


async def _empty(engine: AsyncEngine, table: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {table}"))


async def _until_rows(engine: AsyncEngine, table: Any, expected: int) -> None:
    """Wait until `table` holds `expected` rows; a plain count, light on the database."""
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while True:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
        if rows >= expected:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{table.__tablename__} did not reach {expected} rows")
        await asyncio.sleep(0.25)


def _exact(rows: tuple[int, int], pages: int, who: str) -> None:
    expected = pages * ITEMS_PER_PAGE
    if rows != (expected, expected):
        raise AssertionError(f"{who}: {rows[0]} rows, {rows[1]} links after {pages} pages")


class _Ours:
    """Upload to SUCCESS through the gateway."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: str, engine: AsyncEngine):
        self.loop = loop
        self.engine = engine
        self.channel = loop.run_until_complete(self._connect(address))
        self.stub = queue_service_pb2_grpc.QueueServiceStub(self.channel)

    @staticmethod
    async def _connect(address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address)

    async def _upload(self, pages: Sequence[int]) -> list[str]:
        queue = list(pages)
        ids: list[str] = []

        async def client() -> None:
            while queue:
                request = queue_service_pb2.UploadRequest(page=queue.pop(0))
                response = await self.stub.Upload(request, metadata=METADATA, timeout=30)
                ids.append(response.task.id)

        await asyncio.gather(*(client() for _ in range(UPLOAD_CLIENTS)))
        return ids

    async def _finished_at(self, ids: Sequence[str]) -> float:
        """The last finish time of the tasks `ids`, once GetStatus says all are SUCCESS."""
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        left = list(ids)
        last = 0.0
        # All 400 at once waited over 30 s for the gateway's 20 database connections on a
        # loaded machine, and the gateway answered UNAVAILABLE.
        in_flight = asyncio.Semaphore(UPLOAD_CLIENTS)

        async def status(task_id: str) -> queue_service_pb2.GetStatusResponse:
            while True:
                try:
                    async with in_flight:
                        return await self.stub.GetStatus(
                            queue_service_pb2.GetStatusRequest(id=task_id), metadata=METADATA
                        )
                except grpc.aio.AioRpcError as error:
                    # A PostgreSQL shared with others' tests runs out of connections at times;
                    # the finish times are the worker's, so asking again changes no figure.
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

        while left:
            tasks = await asyncio.gather(*(status(task_id) for task_id in left))
            left = []
            for answer in tasks:
                task = answer.task
                if task.status == task_pb2.TASK_STATUS_SUCCESS:
                    finish = task.finish_time.ToDatetime(tzinfo=dt.UTC).timestamp()
                    last = max(last, finish)
                elif task.status in (task_pb2.TASK_STATUS_FAILURE, task_pb2.TASK_STATUS_REVOKED):
                    raise AssertionError(f"task {task.id} (page {task.page}) failed: {task.error}")
                else:
                    left.append(task.id)
            if left:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(left)} tasks did not finish")
                await asyncio.sleep(0.2)
        return last

    async def harvest(self, pages: Sequence[int]) -> float:
        started = time.time()
        ids = await self._upload(pages)
        await _until_rows(self.engine, Project, len(pages) * ITEMS_PER_PAGE)
        finished = await self._finished_at(ids)
        _exact(await _rows(self.engine, Project), len(pages), "ours")
        return len(pages) / (finished - started)

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close(None))


class _Baseline:
    """`.delay()` per page, to the original design's worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: Settings, engine: AsyncEngine):
        self.loop = loop
        self.engine = engine
        self.app, self.task = make_app(settings)

    def harvest(self, pages: Sequence[int]) -> float:
        started = time.time()
        results = [self.task.delay(page) for page in pages]
        self.loop.run_until_complete(
            _until_rows(self.engine, BaselineProject, len(pages) * ITEMS_PER_PAGE)
        )
        finished = 0.0
        for result in results:
            value = result.get(timeout=RUN_TIMEOUT_SECONDS)
            assert value["found"] == ITEMS_PER_PAGE, value
            done = result.date_done
            assert isinstance(done, dt.datetime), done
            done = done if done.tzinfo else done.replace(tzinfo=dt.UTC)
            finished = max(finished, done.timestamp())
        _exact(
            self.loop.run_until_complete(_rows(self.engine, BaselineProject)),
            len(pages),
            "baseline",
        )
        return len(pages) / (finished - started)

    def close(self) -> None:
        self.app.close()


async def _backend(engine: AsyncEngine) -> psutil.Process:
    """The PostgreSQL server process serving `engine`'s one connection."""
    async with engine.connect() as conn:
        return psutil.Process((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def _postmaster(engine: AsyncEngine) -> int:
    """The pid of the PostgreSQL server `engine` talks to (its connections' parent)."""
    parent = (await _backend(engine)).parent()
    assert parent is not None, "a PostgreSQL backend without its postmaster"
    return parent.pid


def _redis_server(url: str) -> int:
    """The pid of the Redis server at `url` (on this machine: the bench's are)."""
    with redis.Redis.from_url(url) as client:
        return int(client.info("server")["process_id"])


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def _cpu_per_page(engine: AsyncEngine, batch_size: int, parser: SourceParser) -> float:
    """CPU seconds to parse and store one new 100-item page alone: FLOOR_PAGES pages, one
    after the other, and their CPU divided by their number.

    This process's CPU and that of the PostgreSQL backend that stores the pages: both are the
    machine's work for a page. `engine` has one connection, so one backend does all of it.
    The backend's CPU is read from /proc, in clock ticks of 10 ms: read around each page, a
    page's 2-10 ms came out as whole ticks (and the median of such readings as 0 or 10), so it
    is read around the block.
    """
    # Links of their own, not those of the runs, and new on every turn: the table is emptied
    # before each run of ours, and a turn stores after one.
    backend = await _backend(engine)
    first = FLOOR_FIRST_PAGE[parser]
    bodies = [
        (page, data.listing(page, ITEMS_PER_PAGE)) for page in range(first, first + FLOOR_PAGES)
    ]
    started = time.process_time() + _cpu_seconds(backend)
    for page, body in bodies:
        parsed = parse_listing(body, data.page_url(page), data.PROFILE, None, parser)
        await store_projects(engine, parsed.items, batch_size)
    return (time.process_time() + _cpu_seconds(backend) - started) / FLOOR_PAGES


# Who spends a harvest run's CPU, in the order the figure's note names them.
ROLES = ("workers", "PostgreSQL", "gateway", "Redis", "site", "bench")


def _tree(pid: int) -> list[psutil.Process]:
    """The process `pid` and its descendants (a gateway's serving processes)."""
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cpu_of(processes: Sequence[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            seconds[process.pid] = _cpu_seconds(process)
    return seconds


@dataclass
class _RoleCpu:
    """The CPU seconds each role spends over a run."""

    worker_pids: Callable[[], Sequence[int]]
    gateway_pid: int
    site_pid: int
    postgres_pid: int  # the postmaster: its children are the connections and its own workers
    redis_pid: int

    def _processes(self) -> dict[str, list[psutil.Process]]:
        return {
            "workers": [p for pid in self.worker_pids() for p in _tree(pid)],
            "PostgreSQL": _tree(self.postgres_pid),
            "gateway": _tree(self.gateway_pid),
            "Redis": _tree(self.redis_pid),
            "site": _tree(self.site_pid),
            "bench": [psutil.Process()],
        }

    def read(self) -> dict[str, dict[int, float]]:
        return {role: _cpu_of(processes) for role, processes in self._processes().items()}

    def since(self, before: dict[str, dict[int, float]]) -> dict[str, float]:
        """Each role's CPU seconds since `before`; a process started meanwhile counts whole."""
        spent = {}
        for role, now in self.read().items():
            earlier = before.get(role, {})
            spent[role] = sum(cpu - earlier.get(pid, 0.0) for pid, cpu in now.items())
        return spent


def _start_baseline_worker(directory: Path, env: dict[str, str]) -> Process:
    args = [
        str(BIN / "celery"), "-A", "bench.baseline_worker", "worker",
        "--pool", "prefork", "--concurrency", str(WORKERS), "--loglevel", "INFO",
        "--hostname", f"bench-baseline-{os.getpid()}-{time.monotonic_ns()}@%h",
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    process = Process("baseline-worker", args, clean_environment(env), directory)
    process.wait_for_line(r"ready\.")
    return process


async def _create_baseline_table(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


class _Workers:
    """Our 2 worker processes, started with the parser and settings a run needs (the others
    stopped first)."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.running: tuple[SourceParser, tuple[tuple[str, str], ...]] | None = None
        self.processes: list[Process] = []

    def use(self, parser: SourceParser, extra: Mapping[str, str] | None = None) -> None:
        """Workers reading pages with `parser`, with the settings `extra` on top."""
        wanted = (parser, tuple(sorted((extra or {}).items())))
        if wanted == self.running:
            return
        self.stop()
        env = {**self.env, **(extra or {}), "SOURCE_PARSER": parser}
        # Started together, then waited for: half the wait of one after the other.
        for index in range(WORKERS):
            args = [
                str(BIN / "celery"), "-A", "worker.app", "worker",
                "--loglevel", "INFO", "--concurrency", str(WORKER_CONCURRENCY),
                "--hostname", f"worker-{parser}-{index}-{os.getpid()}-{time.monotonic_ns()}@%h",
                "--without-mingle", "--without-gossip",
            ]  # fmt: skip
            name = f"worker-{parser}-{index}"
            self.processes.append(Process(name, args, clean_environment(env), self.directory))
        for process in self.processes:
            process.wait_for_line(r"ready\.")
        self.running = wanted

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes = []
        self.running = None


def _scrapy_installed() -> bool:
    return importlib.util.find_spec("scrapy") is not None


class _Scrapy:
    """The pages split between 2 `python -m bench.scrapy_peer` processes, one per core."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = clean_environment(env)

    def harvest(self, pages: Sequence[int]) -> tuple[float, float]:
        """(first request, last commit) of the two processes together."""
        half = (len(pages) + 1) // 2
        shares = [pages[:half], pages[half:]]
        runs = [
            subprocess.Popen(
                [
                    str(PYTHON), "-m", "bench.scrapy_peer", self.env["SOURCE_URL"],
                    self.env["DATABASE_URL"], str(share[0]), str(share[-1]),
                ],
                cwd=self.directory, env=self.env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
            for share in shares
        ]  # fmt: skip
        reports = []
        errors = ""
        for run in runs:
            out, err = run.communicate(timeout=RUN_TIMEOUT_SECONDS)
            errors += err[-2000:]
            if run.returncode != 0 or not out.strip():
                raise AssertionError(f"scrapy_peer exited {run.returncode}:\n{errors}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
        stored = sum(report["stored"] for report in reports)
        if stored != len(pages) * ITEMS_PER_PAGE:
            raise AssertionError(f"scrapy: {stored} items from {len(pages)} pages:\n{errors}")
        return (
            min(report["started"] for report in reports),
            max(report["finished"] for report in reports),
        )


@dataclass
class _Harvest:
    """Everything one harvest section runs on; `run_*` do one timed run of a side."""

    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    floor_engine: AsyncEngine
    batch_size: int
    pages: _Pages
    workers: _Workers
    ours: _Ours
    scrapy: _Scrapy
    baseline: _Baseline
    role_cpu: _RoleCpu
    # Per parser, each run's CPU seconds a page by role (the warm-up's first).
    cpu_by_role: dict[SourceParser, list[dict[str, float]]] = field(default_factory=dict)

    def _prepare(self, table: str, numbers: Sequence[int]) -> None:
        self.loop.run_until_complete(_empty(self.engine, table))
        self.pages.script(numbers)

    def run_ours(self, numbers: Sequence[int], parser: SourceParser) -> float:
        self.workers.use(parser)
        self._prepare("projects", numbers)
        before = self.role_cpu.read()
        rate = self.loop.run_until_complete(self.ours.harvest(numbers))
        spent = self.role_cpu.since(before)
        self.cpu_by_role.setdefault(parser, []).append(
            {role: seconds / len(numbers) for role, seconds in spent.items()}
        )
        return rate

    def run_scrapy(self, numbers: Sequence[int]) -> float:
        self.workers.stop()
        self._prepare("projects", numbers)
        started, finished = self.scrapy.harvest(numbers)
        _exact(self.loop.run_until_complete(_rows(self.engine, Project)), len(numbers), "scrapy")
        return len(numbers) / (finished - started)

    def run_baseline(self, numbers: Sequence[int]) -> float:
        self._prepare("baseline_projects", numbers)
        return self.baseline.harvest(numbers)

    def cpu_per_page(self, parser: SourceParser) -> float:
        return self.loop.run_until_complete(
            _cpu_per_page(self.floor_engine, self.batch_size, parser)
        )


def _measure(
    options: Options, directory: Path, redis_url: str, prefix: str, database_url: str
) -> tuple[dict[str, list[float]], dict[SourceParser, list[dict[str, float]]], int, int]:
    """Samples of both sides and of the CPU floor, the CPU a page by role in our runs (after
    the warm-ups), and the pages of each side's runs."""
    our_pages = list(range(1, (OUR_PAGES // 4 if options.quick else OUR_PAGES) + 1))
    base_pages = list(range(1, (BASELINE_PAGES // 3 if options.quick else BASELINE_PAGES) + 1))
    bodies = {
        page: data.listing(page, ITEMS_PER_PAGE).decode()
        for page in range(1, max(len(our_pages), len(base_pages)) + 1)
    }
    processes: list[Process] = []
    workers: _Workers | None = None
    loop = asyncio.new_event_loop()
    # The bench's own reads and TRUNCATEs: few connections, for a PostgreSQL shared with others.
    engine = create_engine(database_url, pool_size=2)
    # As the worker's engine is (no ping before each statement), with the one connection
    # whose server process `_cpu_per_page` reads.
    floor_engine = create_engine(database_url, pool_size=1, max_overflow=0, pre_ping=False)
    try:
        site = start_site(directory)
        processes.append(site.process)
        env = environment(
            directory,
            redis_url,
            prefix,
            database_url,
            SOURCE_URL=site.source_url,
            WORKER_CONCURRENCY=str(WORKER_CONCURRENCY),
        )
        settings = Settings(
            celery_broker_url=redis_url,
            celery_result_backend=redis_url,
            redis_key_prefix=prefix,
            task_queue=env["TASK_QUEUE"],
            database_url=database_url,
            source_url=site.source_url,
        )
        workers = ours_workers = _Workers(directory, env)
        with gateway(directory, env) as (gateway_process, address):
            workers.use("beautifulsoup")
            processes.append(_start_baseline_worker(directory, env))
            loop.run_until_complete(_create_baseline_table(engine))
            say(
                f"harvest: {WORKERS} worker processes a side; ours (both parsers) "
                f"{len(our_pages)} pages, "
                f"baseline {len(base_pages)}; {ITEMS_PER_PAGE} items a page, "
                f"{SITE_DELAY_SECONDS * 1000:.0f} ms a page"
            )
            harvest = _Harvest(
                loop,
                engine,
                floor_engine,
                settings.upsert_batch_size,
                _Pages(site, bodies),
                workers,
                _Ours(loop, address, engine),
                _Scrapy(directory, env),
                _Baseline(loop, settings, engine),
                _RoleCpu(
                    lambda: [process.pid for process in ours_workers.processes],
                    gateway_process.pid,
                    site.process.pid,
                    loop.run_until_complete(_postmaster(engine)),
                    _redis_server(redis_url),
                ),
            )
            sides = {
                "ours": lambda: harvest.run_ours(our_pages, "beautifulsoup"),
                "ours lxml": lambda: harvest.run_ours(our_pages, "lxml"),
            }
            if _scrapy_installed():
                sides["scrapy"] = lambda: harvest.run_scrapy(our_pages)
            else:
                say("  harvest_vs_scrapy left out: Scrapy is not installed (pip install scrapy)")
            try:
                samples = interleaved(
                    options.runs,
                    {
                        **sides,
                        "baseline": lambda: harvest.run_baseline(base_pages),
                        "CPU s/page alone": lambda: harvest.cpu_per_page("beautifulsoup"),
                        "CPU s/page alone lxml": lambda: harvest.cpu_per_page("lxml"),
                    },
                )
                # The first of each parser's runs was its warm-up.
                cpu_by_role = {parser: runs[1:] for parser, runs in harvest.cpu_by_role.items()}
            finally:
                harvest.ours.close()
                harvest.baseline.close()
    finally:
        if workers is not None:
            workers.stop()
        for process in reversed(processes):
            process.stop()
        loop.run_until_complete(engine.dispose())
        loop.run_until_complete(floor_engine.dispose())
        loop.close()
    return samples, cpu_by_role, len(our_pages), len(base_pages)


def run(options: Options) -> list[Figure]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-harvest-") as name,
        redis_namespace() as (redis_url, prefix),
        postgres_database() as database_url,
    ):
        samples, cpu_by_role, our_pages, base_pages = _measure(
            options, Path(name), redis_url, prefix, database_url
        )
    cores = os.cpu_count() or 1
    baseline = median(samples["baseline"])
    note = (
        f"ours {our_pages} pages, baseline {base_pages}, rows exact on both; "
        f"WORKER_CONCURRENCY={WORKER_CONCURRENCY}"
    )
    figures = []
    for suffix, side, floor_side, target in (
        ("", "ours", "CPU s/page alone", 10.0),
        ("_lxml", "ours lxml", "CPU s/page alone lxml", 12.0),
    ):
        ours = median(samples[side])
        cpu = samples[floor_side]
        cpu_per_page = median(cpu)
        parser = "lxml" if suffix else "BeautifulSoup"
        figures += [
            Figure(
                f"harvest_pages_per_s{suffix}",
                ours,
                baseline,
                "pages/s",
                higher_is_better=True,
                target=target,
                note=f"{note}; SOURCE_PARSER={'lxml' if suffix else 'beautifulsoup'}",
                samples={"ours": samples[side], "baseline": samples["baseline"]},
            ),
            Figure(
                f"harvest_vs_cpu_floor{suffix}",
                ours,
                cores / cpu_per_page,
                "pages/s",
                higher_is_better=True,
                target=0.9,
                note=(
                    f"baseline: the CPU floor, {cores} cores / {cpu_per_page * 1000:.1f} ms of "
                    f"CPU to parse ({parser}) and store one page alone (with PostgreSQL's)"
                ),
                samples={"cpu_seconds_per_page": cpu},
            ),
        ]
        setting: SourceParser = "lxml" if suffix else "beautifulsoup"
        runs = cpu_by_role.get(setting, [])
        if runs:
            totals = [sum(run.values()) for run in runs]
            by_role = ", ".join(
                f"{role} {median([run[role] for run in runs]) * 1000:.1f}" for role in ROLES
            )
            figures.append(
                Figure(
                    f"harvest_cpu_per_page{suffix}",
                    median(totals) * 1000,
                    cpu_per_page * 1000,
                    "ms CPU",
                    higher_is_better=False,
                    note=(
                        f"ours: the CPU of every process of a run of {our_pages} pages "
                        f"({parser}), a page; medians by role, ms: {by_role}; "
                        "baseline: the floor's, a page's parse and store alone"
                    ),
                    samples={
                        "ms_per_page": [total * 1000 for total in totals],
                        **{
                            f"{role}_ms_per_page": [run[role] * 1000 for run in runs]
                            for role in ROLES
                        },
                    },
                ),
            )
    if "scrapy" in samples:
        scrapy = median(samples["scrapy"])
        scrapy_note = (
            f"baseline: Scrapy (bench/scrapy_peer.py), 2 processes splitting the {our_pages} "
            "pages, the same selectors via parsel, 100-item batch upserts"
        )
        figures += [
            Figure(
                "harvest_vs_scrapy",
                median(samples["ours lxml"]),
                scrapy,
                "pages/s",
                higher_is_better=True,
                target=1.0,
                note=f"ours with SOURCE_PARSER=lxml; {scrapy_note}",
                samples={"ours": samples["ours lxml"], "baseline": samples["scrapy"]},
            ),
            Figure(
                "harvest_vs_scrapy_bs4",
                median(samples["ours"]),
                scrapy,
                "pages/s",
                higher_is_better=True,
                note=f"ours with SOURCE_PARSER=beautifulsoup; {scrapy_note}",
                samples={"ours": samples["ours"], "baseline": samples["scrapy"]},
            ),
        ]
    return figures

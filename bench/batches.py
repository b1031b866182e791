"""`batch_pages_per_s` (one UploadPages against single Uploads) and `watch_latency` (WatchStatus).

One setup for both, built from `bench/harvest.py`'s: the scriptable sample site answering
100-item pages 250 ms late, a real `python -m gateway` and 2 `celery -A worker.app worker`
processes at the default WORKER_CONCURRENCY, a fresh PostgreSQL database, a key prefix of its
own on the machine's Redis. The four sides take turns (`bench.common.interleaved`):

- `batch_pages_per_s`, ours: one `UploadPages(1, 400)`, then `WatchBatch` until the stream ends
  with the batch's final state; the run's rate is 400 pages / (that last message's arrival -
  the time before the call). Baseline: the same 400 pages as 400 single `Upload`s from 16
  clients, each task watched with `WatchStatus` from its Upload's answer until its stream ends
  with its final state (the push the API offers a client of single Uploads; polling 400 ids
  with GetStatus would cost more), 400 / (the last stream's last message - the time before the
  first call). Both are end to end: from the first call to when the client knows every page's
  outcome. Both start from an empty table and must end with rows == distinct links ==
  400 * 100, every page SUCCESS; the target is >= 1.0x. Their warm-ups are 100 pages each (a
  run of 400 takes about 25 s here).
- `watch_latency`, ours: 100 tasks, each watched by a WatchStatus stream of its own (100
  watchers on one grpc.aio channel of this process). The workers stop consuming (Celery's
  cancel_consumer) while the tasks are Uploaded and every stream has its first answer
  (PENDING), then consume again, so each task's STARTED and SUCCESS happen while it is watched.
  A change's time is what the worker wrote to the task's record (start_time, taken as the
  worker starts the task; finish_time, taken as it ends it; both `datetime.now(UTC)` before the
  commit, on this machine's clock); it is delivered by the first message on the stream that
  shows it (a stream that coalesces STARTED into SUCCESS delivers both then), and its delay is
  that message's arrival (`time.time()` as it comes off the call) minus the change's time:
  commit, the worker's event, the gateway's wake-up, its reads and the send, all included. The
  figure is the median over runs of each run's p99 of its 200 delays, against 100 ms; baseline:
  the same with 1 task and 1 watcher.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncEngine

from bench import data
from bench.common import Options, interleaved, say
from bench.harvest import (
    ITEMS_PER_PAGE,
    METADATA,
    RUN_TIMEOUT_SECONDS,
    SITE_DELAY_SECONDS,
    UPLOAD_CLIENTS,
    WORKER_CONCURRENCY,
    WORKERS,
    _empty,
    _exact,
    _Ours,
    _Pages,
    _rows,
)
from bench.report import Figure, median, percentile
from bench.services import environment, gateway, postgres_database, redis_namespace
from core.celery_config import make_celery
from core.db import Project, create_engine
from core.settings import Settings
from projects.v1 import queue_service_pb2, queue_service_pb2_grpc, task_pb2
from tests.support.processes import Process, start_site, start_worker

BATCH_PAGES = 400
# The warm-up of the batch and the single Uploads: connections, caches and the table's pages
# warmed in a quarter of a run's time (the warm-ups of the 400 pages took a minute).
WARM_UP_PAGES = 100
WATCHERS = 100
LATENCY_TARGET_MS = 100.0
STATUS = task_pb2.TaskStatus


def _seconds(timestamp: Timestamp) -> float:
    return timestamp.ToDatetime(tzinfo=dt.UTC).timestamp()


@dataclass
class _Round:
    """One watch round's delays (seconds), and what they were of."""

    delays: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)  # the STARTED changes' delays
    finished: list[float] = field(default_factory=list)  # the SUCCESS changes' delays
    coalesced: int = 0  # STARTED changes first shown by the SUCCESS message


class _Watch:
    """WATCHERS (or 1) tasks, each watched by a WatchStatus stream, through their lives."""

    def __init__(self, stub: queue_service_pb2_grpc.QueueServiceAsyncStub, settings: Settings):
        self.stub = stub
        self.queue = settings.task_queue
        # Only for the workers' remote control: stop and resume consuming the queue.
        self.control = make_celery(settings, "bench-watch-control")
        self.rounds: dict[int, list[_Round]] = {}

    def _consume(self, on: bool) -> None:
        command = self.control.control.add_consumer if on else self.control.control.cancel_consumer
        replies = command(self.queue, reply=True, timeout=5) or []
        if len(replies) != WORKERS:
            raise RuntimeError(f"{len(replies)} of {WORKERS} workers answered: {replies}")

    async def _watch(
        self, task_id: str, opened: asyncio.Event, arrivals: list[tuple[float, task_pb2.Task]]
    ) -> None:
        stream = self.stub.WatchStatus(
            queue_service_pb2.WatchStatusRequest(id=task_id),
            metadata=METADATA,
            timeout=RUN_TIMEOUT_SECONDS,
        )
        try:
            async for response in stream:
                arrivals.append((time.time(), response.task))
                opened.set()
        finally:
            opened.set()  # an error ends the round below, not at the timeout

    async def _round(self, tasks: int) -> _Round:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._consume, False)
        try:
            uploaded = await asyncio.gather(
                *(
                    self.stub.Upload(
                        queue_service_pb2.UploadRequest(page=1 + index),
                        metadata=METADATA,
                        timeout=30,
                    )
                    for index in range(tasks)
                )
            )
            ids = [answer.task.id for answer in uploaded]
            opened = [asyncio.Event() for _ in ids]
            arrivals: list[list[tuple[float, task_pb2.Task]]] = [[] for _ in ids]
            streams = [
                asyncio.ensure_future(self._watch(task_id, opened[index], arrivals[index]))
                for index, task_id in enumerate(ids)
            ]
            await asyncio.wait_for(
                asyncio.gather(*(event.wait() for event in opened)), RUN_TIMEOUT_SECONDS
            )
            for index, got in enumerate(arrivals):
                if not got:
                    await streams[index]  # raises what ended it
                    raise AssertionError(f"the stream of task {ids[index]} ended at once")
                if got[0][1].status != STATUS.TASK_STATUS_PENDING:
                    raise AssertionError(f"task {ids[index]} ran while paused: {got[0][1]}")
        finally:
            await loop.run_in_executor(None, self._consume, True)
        await asyncio.wait_for(asyncio.gather(*streams), RUN_TIMEOUT_SECONDS)
        result = _Round()
        for got in arrivals:
            last = got[-1][1]
            if last.status != STATUS.TASK_STATUS_SUCCESS:
                raise AssertionError(f"task {last.id} ended {last.status}: {last.error}")
            started = next(at for at, task in got if task.HasField("start_time"))
            finished = next(at for at, task in got if task.HasField("finish_time"))
            result.coalesced += started == finished
            result.started.append(started - _seconds(last.start_time))
            result.finished.append(finished - _seconds(last.finish_time))
        result.delays = result.started + result.finished
        return result

    def run(self, loop: asyncio.AbstractEventLoop, tasks: int) -> float:
        """One round; its p99 delay in ms (the round is kept for the figure's note)."""
        done = loop.run_until_complete(self._round(tasks))
        self.rounds.setdefault(tasks, []).append(done)
        return percentile(done.delays, 0.99) * 1000

    def close(self) -> None:
        self.control.close()


class _Batch:
    """UploadPages to the batch's end, watched with WatchBatch."""

    def __init__(self, stub: queue_service_pb2_grpc.QueueServiceAsyncStub, engine: AsyncEngine):
        self.stub = stub
        self.engine = engine
        self.observed: list[float] = []  # seconds from the finish_time to the stream's last

    async def harvest(self, pages: Sequence[int]) -> float:
        started = time.time()
        answer = await self.stub.UploadPages(
            queue_service_pb2.UploadPagesRequest(first_page=pages[0], last_page=pages[-1]),
            metadata=METADATA,
            timeout=30,
        )
        last: task_pb2.Batch | None = None
        async for response in self.stub.WatchBatch(
            queue_service_pb2.WatchBatchRequest(id=answer.batch.id),
            metadata=METADATA,
            timeout=RUN_TIMEOUT_SECONDS,
        ):
            last = response.batch
        known = time.time()
        if last is None or not last.HasField("finish_time"):
            raise AssertionError(f"WatchBatch ended before the batch did: {last}")
        if last.status != STATUS.TASK_STATUS_SUCCESS or last.pages_succeeded != len(pages):
            raise AssertionError(f"the batch ended {last.status}: {last}")
        _exact(await _rows(self.engine, Project), len(pages), "batch")
        self.observed.append(known - _seconds(last.finish_time))
        return len(pages) / (known - started)


class _Singles:
    """Single Uploads, each task watched with WatchStatus to its final state."""

    def __init__(self, stub: queue_service_pb2_grpc.QueueServiceAsyncStub, engine: AsyncEngine):
        self.stub = stub
        self.engine = engine
        self.observed: list[float] = []  # seconds from the last finish_time to the last message

    async def _watch(self, task_id: str) -> task_pb2.Task:
        last: task_pb2.Task | None = None
        async for response in self.stub.WatchStatus(
            queue_service_pb2.WatchStatusRequest(id=task_id),
            metadata=METADATA,
            timeout=RUN_TIMEOUT_SECONDS,
        ):
            last = response.task
        if last is None or last.status != STATUS.TASK_STATUS_SUCCESS:
            raise AssertionError(f"task {task_id} ended {last}")
        return last

    async def harvest(self, pages: Sequence[int]) -> float:
        started = time.time()
        queue = list(pages)
        watches: list[asyncio.Future[task_pb2.Task]] = []

        async def client() -> None:
            while queue:
                request = queue_service_pb2.UploadRequest(page=queue.pop(0))
                answer = await self.stub.Upload(request, metadata=METADATA, timeout=30)
                watches.append(asyncio.ensure_future(self._watch(answer.task.id)))

        try:
            await asyncio.gather(*(client() for _ in range(UPLOAD_CLIENTS)))
            tasks = await asyncio.gather(*watches)
        except BaseException:
            for watch in watches:
                watch.cancel()
            raise
        known = time.time()
        _exact(await _rows(self.engine, Project), len(pages), "single Uploads")
        self.observed.append(known - max(_seconds(task.finish_time) for task in tasks))
        return len(pages) / (known - started)


@dataclass
class _Sides:
    """What the section's four sides run on; each `run_*` is one timed run."""

    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    pages: _Pages
    singles: _Singles
    batch: _Batch
    watch: _Watch
    numbers: list[int]
    warmed: set[str] = field(default_factory=set)

    def _prepare(self, numbers: Sequence[int]) -> None:
        self.loop.run_until_complete(_empty(self.engine, "projects"))
        self.pages.script(numbers)

    def _pages(self, side: str) -> list[int]:
        """The side's pages: WARM_UP_PAGES for its warm-up (its first run), else all."""
        if side in self.warmed:
            return self.numbers
        self.warmed.add(side)
        return self.numbers[:WARM_UP_PAGES]

    def run_batch(self) -> float:
        numbers = self._pages("batch")
        self._prepare(numbers)
        return self.loop.run_until_complete(self.batch.harvest(numbers))

    def run_singles(self) -> float:
        numbers = self._pages("singles")
        self._prepare(numbers)
        return self.loop.run_until_complete(self.singles.harvest(numbers))

    def run_watch(self, tasks: int) -> float:
        self._prepare(range(1, tasks + 1))
        return self.watch.run(self.loop, tasks)


def _measure(
    options: Options, directory: Path, redis_url: str, prefix: str, database_url: str
) -> tuple[dict[str, list[float]], _Sides]:
    numbers = list(range(1, (BATCH_PAGES // 4 if options.quick else BATCH_PAGES) + 1))
    bodies = {page: data.listing(page, ITEMS_PER_PAGE).decode() for page in numbers}
    processes: list[Process] = []
    loop = asyncio.new_event_loop()
    engine = create_engine(database_url)
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
        with gateway(directory, env) as (_, address):
            for index in range(WORKERS):
                processes.append(
                    start_worker(directory, env, f"worker-{index}", WORKER_CONCURRENCY)
                )
            say(
                f"batches: {WORKERS} worker processes x {WORKER_CONCURRENCY}; "
                f"{len(numbers)} pages a batch or as single Uploads, {ITEMS_PER_PAGE} items a "
                f"page, {SITE_DELAY_SECONDS * 1000:.0f} ms a page; {WATCHERS} watchers"
            )
            # One channel for every side's calls (the gRPC client of bench.harvest).
            client = _Ours(loop, address, engine)
            sides = _Sides(
                loop,
                engine,
                _Pages(site, bodies),
                _Singles(client.stub, engine),
                _Batch(client.stub, engine),
                _Watch(client.stub, settings),
                numbers,
            )
            try:
                samples = interleaved(
                    options.runs,
                    {
                        "batch": sides.run_batch,
                        "single Uploads": sides.run_singles,
                        f"watch p99 ms, {WATCHERS} watchers": lambda: sides.run_watch(WATCHERS),
                        "watch p99 ms, 1 watcher": lambda: sides.run_watch(1),
                    },
                )
            finally:
                sides.watch.close()
                client.close()
    finally:
        for process in reversed(processes):
            process.stop()
        loop.run_until_complete(engine.dispose())
        loop.close()
    return samples, sides


def run(options: Options) -> list[Figure]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-batches-") as name,
        redis_namespace() as (redis_url, prefix),
        postgres_database() as database_url,
    ):
        samples, sides = _measure(options, Path(name), redis_url, prefix, database_url)
    batch = samples.pop("batch")
    singles = samples.pop("single Uploads")
    many = samples[f"watch p99 ms, {WATCHERS} watchers"]
    one = samples["watch p99 ms, 1 watcher"]
    # The warm-up round is in `rounds` too: leave it out, as `interleaved` does.
    rounds = sides.watch.rounds[WATCHERS][1:]
    p50s = [percentile(r.delays, 0.5) * 1000 for r in rounds]
    maxima = [max(r.delays) * 1000 for r in rounds]
    started = [percentile(r.started, 0.99) * 1000 for r in rounds]
    finished = [percentile(r.finished, 0.99) * 1000 for r in rounds]
    coalesced = sum(r.coalesced for r in rounds)
    observed = sides.batch.observed[1:]
    observed_singles = sides.singles.observed[1:]
    return [
        Figure(
            "batch_pages_per_s",
            median(batch),
            median(singles),
            "pages/s",
            higher_is_better=True,
            target=1.0,
            note=(
                f"one UploadPages of {len(sides.numbers)} pages watched with WatchBatch against "
                f"as many single Uploads each watched with WatchStatus, from the first call to "
                f"the last stream's last message, rows exact on both; those came "
                f"{median(observed) * 1000:.0f} ms (batch) and "
                f"{median(observed_singles) * 1000:.0f} ms (single Uploads) after the last "
                "finish_time (medians); per-run ratios "
                + ", ".join(f"{b / o:.2f}" for b, o in zip(batch, singles, strict=True))
            ),
            samples={"batch": batch, "single_uploads": singles},
        ),
        Figure(
            "watch_latency",
            median(many),
            median(one),
            "ms",
            higher_is_better=False,
            target=LATENCY_TARGET_MS,
            target_on="ours",
            note=(
                f"p99 of the worker's record of STARTED and SUCCESS to the WatchStatus message "
                f"showing it, {WATCHERS} tasks each watched (baseline: 1); p50 "
                f"{median(p50s):.1f} ms, max {median(maxima):.0f} ms, p99 of STARTED "
                f"{median(started):.0f} ms and of SUCCESS {median(finished):.0f} ms (medians "
                "over runs); "
                f"{coalesced} of {len(rounds) * WATCHERS} STARTED first shown with SUCCESS"
            ),
            samples={
                "watchers_100": many,
                "watcher_1": one,
                "p50_ms": p50s,
                "max_ms": maxima,
                "started_p99_ms": started,
                "success_p99_ms": finished,
            },
        ),
    ]

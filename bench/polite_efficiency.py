"""`polite_efficiency`: how much of the source's budget the fleet uses, at 20 requests/s.

The scriptable sample site answers every listing page 250 ms late and counts what arrives (its
own log, with each request's arrival time). A real `python -m gateway` and 2
`celery -A worker.app worker` processes at WORKER_CONCURRENCY harvest pages 1..N with
SOURCE_MAX_REQUESTS_PER_SECOND=20 and the default SOURCE_MAX_CONCURRENCY (8: at 250 ms a page,
20 requests/s needs 5 in flight), into a fresh PostgreSQL database through the machine's Redis.

A run is one UploadPages(1, N) and GetBatch until the batch has its finish time; its figure is
N / (the batch's finish_time, as the worker recorded it, - the time before the call), so the
first page's wait and the last page's store are in it. The figure is the median over runs,
divided by the limit (the baseline, 20 pages/s); the target is >= 0.9. Each run starts from an
empty table and must end with rows == distinct links == N * 10, every page SUCCESS, and the
site's log must show no 429 (the site is capped at the same 20 requests/s: a 429 is how it says
a second had more than 20 arrivals).
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import Options, interleaved, say
from bench.harvest import WORKER_CONCURRENCY, WORKERS, _empty, _rows
from bench.report import Figure, median
from bench.services import environment, gateway, postgres_database, redis_namespace
from core.db import Project, create_engine
from projects.v1 import queue_service_pb2, queue_service_pb2_grpc, task_pb2
from tests.support.processes import Process, Site, start_site, start_worker
from tests.support.stack import TEST_TOKEN
from worker.politeness import LATE_SEND_SECONDS, NOTED_LATE_SECONDS

LIMIT_PER_SECOND = 20
SITE_DELAY_SECONDS = 0.25
PAGES = 300
QUICK_PAGES = 100
ITEMS_PER_PAGE = 10  # the sample site's own pages
TARGET = 0.9
RUN_TIMEOUT_SECONDS = 120.0
METADATA = (("authorization", f"Bearer {TEST_TOKEN}"),)


def most_in_any_second(arrivals: list[float]) -> int:
    arrivals = sorted(arrivals)
    most = end = 0
    for start, first in enumerate(arrivals):
        while end < len(arrivals) and arrivals[end] < first + 1.0:
            end += 1
        most = max(most, end - start)
    return most


class _Run:
    def __init__(self, site: Site, address: str, database_url: str, pages: int) -> None:
        self.site = site
        self.pages = pages
        self.channel = grpc.insecure_channel(address)
        self.stub = queue_service_pb2_grpc.QueueServiceStub(self.channel)
        self.database_url = database_url
        self.arrival_rates: list[float] = []
        self.busiest_seconds: list[int] = []

    def _prepare(self) -> None:
        async def empty() -> None:
            engine = create_engine(self.database_url)
            try:
                await _empty(engine, "projects")
                await _empty(engine, "page_memos")
            finally:
                await engine.dispose()

        asyncio.run(empty())
        self.site.reset()
        self.site.behave(
            pages=self.pages, delay=SITE_DELAY_SECONDS, max_requests_per_second=LIMIT_PER_SECOND
        )

    def __call__(self) -> float:
        self._prepare()
        started = time.time()
        batch = self.stub.UploadPages(
            queue_service_pb2.UploadPagesRequest(first_page=1, last_page=self.pages),
            metadata=METADATA,
            timeout=30,
        ).batch
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while not batch.HasField("finish_time"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch.id} did not finish")
            time.sleep(0.05)
            batch = self.stub.GetBatch(
                queue_service_pb2.GetBatchRequest(id=batch.id), metadata=METADATA, timeout=10
            ).batch
        took = batch.finish_time.ToDatetime().timestamp() - started
        self._check(batch)
        return self.pages / took

    def _check(self, batch: task_pb2.Batch) -> None:
        if batch.status != task_pb2.TASK_STATUS_SUCCESS or batch.pages_succeeded != self.pages:
            raise AssertionError(f"the batch ended {batch}")

        async def rows() -> tuple[int, int]:
            engine = create_engine(self.database_url)
            try:
                return await _rows(engine, Project)
            finally:
                await engine.dispose()

        expected = self.pages * ITEMS_PER_PAGE
        if (found := asyncio.run(rows())) != (expected, expected):
            raise AssertionError(f"{found} rows and links after {self.pages} pages")
        requests = self.site.requests()
        refused = [r for r in requests if r.status == 429]
        if refused:
            raise AssertionError(f"the site answered 429 {len(refused)} times")
        listing = sorted(r.arrival for r in requests if r.path.startswith("/projects"))
        self.arrival_rates.append((len(listing) - 1) / (listing[-1] - listing[0]))
        self.busiest_seconds.append(most_in_any_second([r.arrival for r in requests]))

    def close(self) -> None:
        self.channel.close()


def run(options: Options) -> list[Figure]:
    pages = QUICK_PAGES if options.quick else PAGES
    processes: list[Process] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-polite-") as name,
        redis_namespace() as (redis_url, prefix),
        postgres_database() as database_url,
    ):
        directory = Path(name)
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
                SOURCE_MAX_REQUESTS_PER_SECOND=str(LIMIT_PER_SECOND),
                # The default: the setting's own value, not the bench environment's.
                SOURCE_MAX_CONCURRENCY="8",
            )
            with gateway(directory, env) as (_, address):
                for index in range(WORKERS):
                    processes.append(
                        start_worker(directory, env, f"worker-{index}", WORKER_CONCURRENCY)
                    )
                say(
                    f"polite_efficiency: {WORKERS} worker processes x {WORKER_CONCURRENCY}; "
                    f"{pages} pages at {LIMIT_PER_SECOND} requests/s, "
                    f"{SITE_DELAY_SECONDS * 1000:.0f} ms a page"
                )
                measured = _Run(site, address, database_url, pages)
                try:
                    samples = interleaved(options.runs, {"polite": measured})
                finally:
                    measured.close()
        finally:
            for process in reversed(processes):
                process.stop()
    # Each worker says at shutdown how many requests could not leave on time for their turn.
    said = [
        match
        for process in processes
        for match in re.finditer(
            r"(\d+) sent more than \d+ ms after their start, (\d+) not sent", process.output()
        )
    ]
    sent_late = sum(int(match.group(1)) for match in said)
    late = sum(int(match.group(2)) for match in said)
    polite = samples["polite"]
    # The warm-up is in the lists too: leave it out, as `interleaved` does.
    arrival_rates = measured.arrival_rates[1:]
    busiest = measured.busiest_seconds[1:]
    return [
        Figure(
            "polite_efficiency",
            median(polite),
            float(LIMIT_PER_SECOND),
            "pages/s",
            higher_is_better=True,
            target=TARGET,
            note=(
                f"{pages} pages, UploadPages to the batch's finish_time, with "
                f"SOURCE_MAX_REQUESTS_PER_SECOND={LIMIT_PER_SECOND} on a site answering in "
                f"{SITE_DELAY_SECONDS * 1000:.0f} ms and capped at the same rate (no 429); the "
                f"site saw {median(arrival_rates):.2f} requests/s (median), at most "
                f"{max(busiest)} in any second; {sent_late} requests left more than "
                f"{NOTED_LATE_SECONDS * 1000:.0f} ms after their turn's start, and {late} were not "
                f"sent, having missed it by more than {LATE_SEND_SECONDS * 1000:.0f} ms (all runs)"
            ),
            samples={"pages_per_s": polite, "site_requests_per_s": arrival_rates},
        )
    ]

"""What observing the service costs: Upload and harvest with metrics on and with tracing on,
beside both off in the same run.

Upload (`upload_per_s_metrics_on`, `upload_per_s_tracing_on`, `upload_per_s_task_events_on`):
gateways of the same build on the same PostgreSQL and Redis, each GATEWAY_PROCESSES
processes, driven in turn by the same 32 clients as `bench.upload`, their runs interleaved
and rotated (the machine drifts): one with metrics and tracing off (the baseline), one with
metrics on (GATEWAY_METRICS_ADDRESS, scraped by nobody: serving a scrape is not per call), one
with tracing on at full sampling (`OTEL_TRACES_SAMPLER=always_on`), exporting over OTLP/HTTP
to a receiver in this process; and one with TASK_EVENTS=false, beside which the baseline
(events on, the default) shows what the task-sent event costs an Upload.

Harvest (`harvest_pages_per_s_metrics_on`, `harvest_pages_per_s_tracing_on`): bench/harvest.py's
setup (its site answering 250 ms late, 100 items a page, 2 worker processes, PostgreSQL) with
the workers started in turn with metrics and tracing off, with WORKER_METRICS_ADDRESS (a port
per process, scraped by nobody), and with tracing at full sampling to the same receiver; one
gateway, observing nothing, Uploads for all three, so the difference is the workers'. Only one
set of workers runs at a time (see bench/harvest.py: a shared PostgreSQL's connections), and
each run starts from an empty table and must end with every row stored.

Metrics have a target (at most 5% slower, ratio >= 0.95); tracing's and task events' costs are
reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

from bench import data
from bench.common import Options, say
from bench.harvest import (
    ITEMS_PER_PAGE,
    OUR_PAGES,
    WORKER_CONCURRENCY,
    WORKERS,
    _empty,
    _Ours,
    _Pages,
    _Workers,
)
from bench.report import Figure, median, percentile
from bench.services import environment, gateway, postgres_database, redis_namespace
from bench.upload import GATEWAY_PROCESSES, Run, _Clients
from core.db import create_engine
from tests.support.otlp import OtlpReceiver
from tests.support.processes import free_consecutive_ports, free_port, start_site

WARM_UPLOADS = 1_000
UPLOADS_PER_RUN = 3_000


def _p99_ms(runs: list[Run]) -> float:
    return median([percentile(latencies, 0.99) * 1000 for _, latencies in runs])


def run(options: Options) -> list[Figure]:
    return _upload_figures(options) + _harvest_figures(options)


def _rotated(index: int, names: list[str]) -> list[str]:
    """`names`, starting from another one each run: the first of a round meets a slower
    machine."""
    shift = index % len(names)
    return names[shift:] + names[:shift]


def _upload_figures(options: Options) -> list[Figure]:
    warm = WARM_UPLOADS // 5 if options.quick else WARM_UPLOADS
    per_run = UPLOADS_PER_RUN // 5 if options.quick else UPLOADS_PER_RUN
    with (
        tempfile.TemporaryDirectory(prefix="bench-observability-") as name,
        redis_namespace() as (redis_url, prefix),
        postgres_database() as database_url,
        OtlpReceiver() as receiver,
    ):
        directory = Path(name)
        base = environment(
            directory, redis_url, prefix, database_url, GATEWAY_PROCESSES=str(GATEWAY_PROCESSES)
        )
        # One metrics port per gateway process (port + i), so a run of consecutive ones.
        metrics_port = free_consecutive_ports(GATEWAY_PROCESSES)
        variants = {
            "off": base,
            "metrics": {
                **base,
                "GATEWAY_ADDRESS": f"127.0.0.1:{free_port()}",
                "GATEWAY_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
            },
            "tracing": {
                **base,
                "GATEWAY_ADDRESS": f"127.0.0.1:{free_port()}",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_TRACES_SAMPLER": "always_on",
            },
            "no task events": {
                **base,
                "GATEWAY_ADDRESS": f"127.0.0.1:{free_port()}",
                "TASK_EVENTS": "false",
            },
        }
        runs: dict[str, list[Run]] = {variant: [] for variant in variants}
        with contextlib.ExitStack() as stack:
            clients: dict[str, _Clients] = {}
            for variant, env in variants.items():
                _, address = stack.enter_context(gateway(directory, env))
                clients[variant] = _Clients(address)
                stack.callback(clients[variant].close)
            say(f"observability: warm-up of {warm} Uploads each, then runs of {per_run}")
            for each in clients.values():
                each.uploads(warm)
            for index in range(options.runs):
                for variant in _rotated(index, list(clients)):
                    runs[variant].append(clients[variant].uploads(per_run))
                shown = ", ".join(f"{v} {r[-1][0]:.0f}/s" for v, r in runs.items())
                say(f"  run {index + 1}/{options.runs}: {shown}")
        spans = len(receiver.received())
    rate = {variant: median([r for r, _ in each]) for variant, each in runs.items()}
    samples = {variant: [r for r, _ in each] for variant, each in runs.items()}
    return [
        Figure(
            "upload_per_s_metrics_on",
            rate["metrics"],
            rate["off"],
            "calls/s",
            higher_is_better=True,
            target=0.95,
            note="the same gateway with GATEWAY_METRICS_ADDRESS set vs unset, runs interleaved",
            samples={"ours": samples["metrics"], "baseline": samples["off"]},
        ),
        Figure(
            "upload_p99_ms_metrics_on",
            _p99_ms(runs["metrics"]),
            _p99_ms(runs["off"]),
            "ms",
            higher_is_better=False,
            note="p99 latency of one Upload, metrics on vs off",
        ),
        Figure(
            "upload_per_s_tracing_on",
            rate["tracing"],
            rate["off"],
            "calls/s",
            higher_is_better=True,
            note=f"tracing at full sampling vs off ({spans} spans exported); reported, no target",
            samples={"ours": samples["tracing"], "baseline": samples["off"]},
        ),
        Figure(
            "upload_per_s_task_events_on",
            rate["off"],
            rate["no task events"],
            "calls/s",
            higher_is_better=True,
            note="TASK_EVENTS=true (the default: a task-sent event per Upload) vs false; "
            "reported, no target",
            samples={"ours": samples["off"], "baseline": samples["no task events"]},
        ),
    ]


def _harvest_figures(options: Options) -> list[Figure]:
    pages = list(range(1, (OUR_PAGES // 4 if options.quick else OUR_PAGES) + 1))
    with (
        tempfile.TemporaryDirectory(prefix="bench-observability-harvest-") as name,
        redis_namespace() as (redis_url, prefix),
        postgres_database() as database_url,
        OtlpReceiver() as receiver,
    ):
        directory = Path(name)
        variants = {
            "off": {},
            # Port 0: each worker process serves on a port the system picks.
            "metrics": {"WORKER_METRICS_ADDRESS": "127.0.0.1:0"},
            "tracing": {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_TRACES_SAMPLER": "always_on",
            },
        }
        samples = _harvest_runs(
            options, directory, redis_url, prefix, database_url, variants, pages
        )
        spans = len(receiver.received())
    rate = {variant: median(each) for variant, each in samples.items()}
    note = (
        f"{len(pages)} pages of {ITEMS_PER_PAGE} items, {WORKERS} worker processes, "
        f"WORKER_CONCURRENCY={WORKER_CONCURRENCY}, rows exact; variants rotated each run"
    )
    return [
        Figure(
            "harvest_pages_per_s_metrics_on",
            rate["metrics"],
            rate["off"],
            "pages/s",
            higher_is_better=True,
            target=0.95,
            note=f"workers with WORKER_METRICS_ADDRESS set vs unset; {note}",
            samples={"ours": samples["metrics"], "baseline": samples["off"]},
        ),
        Figure(
            "harvest_pages_per_s_tracing_on",
            rate["tracing"],
            rate["off"],
            "pages/s",
            higher_is_better=True,
            note=f"workers tracing at full sampling vs off ({spans} spans exported); {note}; "
            "reported, no target",
            samples={"ours": samples["tracing"], "baseline": samples["off"]},
        ),
    ]


def _harvest_runs(
    options: Options,
    directory: Path,
    redis_url: str,
    prefix: str,
    database_url: str,
    variants: dict[str, dict[str, str]],
    pages: list[int],
) -> dict[str, list[float]]:
    """One warm-up of each variant, then `options.runs` rotated rounds; pages/s of each run."""
    bodies = {page: data.listing(page, ITEMS_PER_PAGE).decode() for page in pages}
    loop = asyncio.new_event_loop()
    # The bench's own TRUNCATEs and counts: few connections, for a PostgreSQL shared with others.
    engine = create_engine(database_url, pool_size=2)
    site = start_site(directory)
    env = environment(
        directory,
        redis_url,
        prefix,
        database_url,
        SOURCE_URL=site.source_url,
        WORKER_CONCURRENCY=str(WORKER_CONCURRENCY),
    )
    workers = _Workers(directory, env)
    site_pages = _Pages(site, bodies)
    samples: dict[str, list[float]] = {variant: [] for variant in variants}
    try:
        with gateway(directory, env) as (_, address):
            ours = _Ours(loop, address, engine)

            def harvest(variant: str) -> float:
                workers.use("beautifulsoup", variants[variant])
                loop.run_until_complete(_empty(engine, "projects"))
                site_pages.script(pages)
                return loop.run_until_complete(ours.harvest(pages))

            try:
                say(
                    f"observability, harvest: {len(pages)} pages a run, workers with "
                    f"{', '.join(variants)} in turn"
                )
                for variant in variants:
                    harvest(variant)
                    say(f"  warm-up {variant} done")
                for index in range(options.runs):
                    for variant in _rotated(index, list(variants)):
                        samples[variant].append(harvest(variant))
                    shown = ", ".join(f"{v} {r[-1]:.1f} pages/s" for v, r in samples.items())
                    say(f"  run {index + 1}/{options.runs}: {shown}")
            finally:
                ours.close()
    finally:
        workers.stop()
        site.process.stop()
        loop.run_until_complete(engine.dispose())
        loop.close()
    return samples

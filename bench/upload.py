"""`upload_per_s` (with p50 and p99 latency) and `gateway_rss_growth`.

Ours: a real `python -m gateway` (PostgreSQL task records, the machine's Redis as broker) and
32 concurrent gRPC clients, each on a channel (and so a connection) of its own, calling Upload
as fast as it answers. The baseline publishes the same task with a plain `send_task` loop in
one process against the same Redis (the gateway's own Celery app class, so the publishing is
the same and only gRPC and the task record are missing).

Beside them, the same clients drive `bench.noop_gateway`, a grpc.aio QueueService whose Upload
does nothing: the floor, what Python gRPC can answer here at all (and its latency at 32 calls in
flight), so the table shows how much of the gap is gRPC itself. It runs both as one process and
as many processes as the gateway serves with, and each floor figure takes the better of the two
(one process has had the lower p99 here, the clients sharing the 2 cores with it).

And beside the no-op, the no-op `--grouped`: an Upload that still does nothing but waits the way
ours does, on a group that goes to one thread and back (`bench/noop_gateway.py`), as many
processes as the gateway: `noop_grouped_vs_noop_grpc` is what that shape alone costs under
grpc.aio, against the plain no-op of as many processes.

One gateway takes every Upload of the section: 2,000 as the warm-up, then the measured runs up
to 20,000 in all. Its RSS after the first 2,000 divided by its RSS after all 20,000 is
`gateway_rss_growth` (1.0: no growth; the target allows 10%).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil

from bench.common import Options, say
from bench.report import Figure, median, percentile
from bench.services import environment, gateway, postgres_database, redis_namespace
from core.celery_config import HARVEST_TASK_NAME, make_celery
from core.settings import Settings
from gateway.celery_queue import PublishingCelery
from projects.v1 import queue_service_pb2, queue_service_pb2_grpc
from tests.support.processes import PYTHON, Process, clean_environment, free_port
from tests.support.stack import TEST_TOKEN

CLIENTS = 32
GATEWAY_PROCESSES = os.cpu_count() or 1
WARM_UPLOADS = 2_000
TOTAL_UPLOADS = 20_000
METADATA = (("authorization", f"Bearer {TEST_TOKEN}"),)
Run = tuple[float, list[float]]  # calls per second, and each call's latency in seconds


class _Clients:
    """CLIENTS gRPC clients on one event loop, each with a connection of its own."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.channels = self.loop.run_until_complete(self._connect(address))
        self.stubs = [queue_service_pb2_grpc.QueueServiceStub(c) for c in self.channels]

    @staticmethod
    async def _connect(address: str) -> list[grpc.aio.Channel]:
        # A local subchannel pool each: otherwise channels to one address share a connection.
        return [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CLIENTS)
        ]

    async def _uploads(self, count: int) -> Run:
        latencies: list[float] = []
        left = count

        async def client(stub: queue_service_pb2_grpc.QueueServiceAsyncStub) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                request = queue_service_pb2.UploadRequest(page=1 + left % 1000)
                started = time.perf_counter()
                await stub.Upload(request, metadata=METADATA, timeout=30)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client(stub) for stub in self.stubs))
        return count / (time.perf_counter() - started), latencies

    def uploads(self, count: int) -> Run:
        return self.loop.run_until_complete(self._uploads(count))

    def close(self) -> None:
        for channel in self.channels:
            self.loop.run_until_complete(channel.close(None))
        self.loop.close()


def _send_task_loop(settings: Settings) -> tuple[PublishingCelery, Callable[[int], Run]]:
    app = make_celery(settings, "bench-send-task", PublishingCelery)
    assert isinstance(app, PublishingCelery)

    def sends(count: int) -> Run:
        latencies: list[float] = []
        started = time.perf_counter()
        for index in range(count):
            sent = time.perf_counter()
            app.send_task(HARVEST_TASK_NAME, args=[1 + index % 1000])
            latencies.append(time.perf_counter() - sent)
        return count / (time.perf_counter() - started), latencies

    return app, sends


@contextlib.contextmanager
def _noop_gateway(
    directory: Path, env: dict[str, str], count: int, grouped: bool = False
) -> Iterator[str]:
    """`count` running `bench.noop_gateway`s (`--grouped` ones if `grouped`) on one port; its
    address."""
    address = f"127.0.0.1:{free_port()}"
    processes: list[Process] = []
    try:
        for index in range(count):
            processes.append(
                Process(
                    f"noop-gateway-{index}",
                    [
                        PYTHON,
                        "-m",
                        "bench.noop_gateway",
                        address,
                        *(["--grouped"] if grouped else []),
                    ],
                    clean_environment({"PYTHONPATH": env["PYTHONPATH"]}),
                    directory,
                )
            )
            processes[-1].wait_for_line("listening on")
        yield address
    finally:
        for process in processes:
            process.stop()


def _rss(pid: int) -> float:
    """The resident set of the process and its children in MiB: the median of 5 readings over
    half a second (with GATEWAY_PROCESSES, the parent supervises and its children serve)."""
    process = psutil.Process(pid)
    readings = []
    for _ in range(5):
        tree = [process, *process.children()]
        readings.append(sum(p.memory_info().rss for p in tree) / 2**20)
        time.sleep(0.1)
    return median(readings)


def run(options: Options) -> list[Figure]:
    total = TOTAL_UPLOADS // 5 if options.quick else TOTAL_UPLOADS
    warm = WARM_UPLOADS // 5 if options.quick else WARM_UPLOADS
    per_run = (total - warm) // options.runs
    with (
        tempfile.TemporaryDirectory(prefix="bench-upload-") as name,
        redis_namespace() as (redis_url, prefix),
        postgres_database() as database_url,
    ):
        directory = Path(name)
        # One gateway process per core, as the README advises for a host of its own.
        env = environment(
            directory, redis_url, prefix, database_url, GATEWAY_PROCESSES=str(GATEWAY_PROCESSES)
        )
        publisher = Settings(
            celery_broker_url=redis_url,
            celery_result_backend=redis_url,
            redis_key_prefix=prefix,
            task_queue=f"{prefix}send-task-loop",
        )
        app, sends = _send_task_loop(publisher)
        with contextlib.ExitStack() as stack:
            process, address = stack.enter_context(gateway(directory, env))
            noop_addresses = {
                count: stack.enter_context(_noop_gateway(directory, env, count))
                for count in sorted({1, GATEWAY_PROCESSES})
            }
            grouped_address = stack.enter_context(
                _noop_gateway(directory, env, GATEWAY_PROCESSES, grouped=True)
            )
            clients = _Clients(address)
            stack.callback(clients.close)
            grouped_clients = _Clients(grouped_address)
            stack.callback(grouped_clients.close)
            noop_clients: dict[int, _Clients] = {}
            for count, noop_address in noop_addresses.items():
                noop_clients[count] = _Clients(noop_address)
                stack.callback(noop_clients[count].close)
            stack.callback(app.close)
            say(f"upload: {CLIENTS} clients; warm-up of {warm} Uploads, then runs of {per_run}")
            clients.uploads(warm)
            sends(warm)
            for each in [*noop_clients.values(), grouped_clients]:
                each.uploads(warm)
            rss_warm = _rss(process.pid)
            ours: list[Run] = []
            base: list[Run] = []
            noops: dict[int, list[Run]] = {count: [] for count in noop_clients}
            grouped: list[Run] = []
            for index in range(options.runs):
                ours.append(clients.uploads(per_run))
                base.append(sends(per_run))
                for count, each in noop_clients.items():
                    noops[count].append(each.uploads(per_run))
                grouped.append(grouped_clients.uploads(per_run))
                shown = ", ".join(
                    f"no-op gRPC x{count} {runs[-1][0]:.0f}/s" for count, runs in noops.items()
                )
                shown += f", grouped no-op x{GATEWAY_PROCESSES} {grouped[-1][0]:.0f}/s"
                say(
                    f"  run {index + 1}/{options.runs}: ours {ours[-1][0]:.0f}/s, "
                    f"send_task loop {base[-1][0]:.0f}/s, {shown}"
                )
            # Up to the total exactly, whatever the number of runs.
            clients.uploads(total - warm - per_run * options.runs)
            rss_end = _rss(process.pid)
            done = total
            say(f"  gateway RSS {rss_warm:.1f} MiB after {warm}, {rss_end:.1f} after {done}")

    def quantile_ms(runs: list[Run], fraction: float) -> list[float]:
        return [percentile(latencies, fraction) * 1000 for _, latencies in runs]

    def noop_note(per_count: dict[int, float], unit: str) -> str:
        shown = ", ".join(
            f"{count} process{'es' if count > 1 else ''} {value:.4g} {unit}"
            for count, value in per_count.items()
        )
        return f"no-op server in {shown} (the better taken)"

    rates = {count: median([rate for rate, _ in runs]) for count, runs in noops.items()}
    p99s = {count: median(quantile_ms(runs, 0.99)) for count, runs in noops.items()}
    fastest = max(rates, key=rates.__getitem__)
    steadiest = min(p99s, key=p99s.__getitem__)

    return [
        Figure(
            "upload_per_s",
            median([rate for rate, _ in ours]),
            median([rate for rate, _ in base]),
            "calls/s",
            higher_is_better=True,
            target=0.8,
            note=f"{CLIENTS} gRPC clients vs a send_task loop in one process, same Redis",
            samples={"ours": [r for r, _ in ours], "baseline": [r for r, _ in base]},
        ),
        Figure(
            "upload_p50_ms",
            median(quantile_ms(ours, 0.5)),
            median(quantile_ms(base, 0.5)),
            "ms",
            higher_is_better=False,
            note="median latency of one Upload (baseline: of one send_task)",
            samples={"ours": quantile_ms(ours, 0.5), "baseline": quantile_ms(base, 0.5)},
        ),
        Figure(
            "upload_p99_ms",
            median(quantile_ms(ours, 0.99)),
            median(quantile_ms(base, 0.99)),
            "ms",
            higher_is_better=False,
            target=20.0,
            target_on="ours",
            note="99th percentile latency of one Upload, with 32 calls in flight",
            samples={"ours": quantile_ms(ours, 0.99), "baseline": quantile_ms(base, 0.99)},
        ),
        Figure(
            "upload_per_s_vs_noop_grpc",
            median([rate for rate, _ in ours]),
            rates[fastest],
            "calls/s",
            higher_is_better=True,
            target=0.7,
            note=(
                "the floor: the same clients against a grpc.aio Upload that does nothing; "
                + noop_note(rates, "calls/s")
            ),
            samples={"ours": [r for r, _ in ours], "baseline": [r for r, _ in noops[fastest]]},
        ),
        Figure(
            "upload_p99_ms_vs_noop_grpc",
            median(quantile_ms(ours, 0.99)),
            p99s[steadiest],
            "ms",
            higher_is_better=False,
            # At most 1.5x the no-op's p99 (the ratio is the no-op's over ours).
            target=1 / 1.5,
            note=(
                "p99 of the no-op gRPC Upload, 32 calls in flight: the least a Python gateway "
                "has (the target: ours at most 1.5x it); " + noop_note(p99s, "ms")
            ),
            samples={
                "ours": quantile_ms(ours, 0.99),
                "baseline": quantile_ms(noops[steadiest], 0.99),
            },
        ),
        Figure(
            "noop_grouped_vs_noop_grpc",
            median([rate for rate, _ in grouped]),
            rates[GATEWAY_PROCESSES],
            "calls/s",
            higher_is_better=True,
            note=(
                "ours: the no-op Upload waiting as ours does, on a group that goes to one "
                "thread and back (nothing recorded or sent); baseline: the plain no-op; both "
                f"{GATEWAY_PROCESSES} processes: what the wait's shape alone costs"
            ),
            samples={
                "ours": [r for r, _ in grouped],
                "baseline": [r for r, _ in noops[GATEWAY_PROCESSES]],
            },
        ),
        Figure(
            "gateway_rss_growth",
            rss_warm / rss_end,
            1.0,
            "RSS ratio",
            higher_is_better=True,
            target=0.91,
            note=(
                f"gateway RSS {rss_warm:.1f} MiB after {warm} Uploads / {rss_end:.1f} MiB "
                f"after {done}; baseline 1.0 is no growth"
            ),
            samples={"ours": [rss_warm, rss_end]},
        ),
    ]

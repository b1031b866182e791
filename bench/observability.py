"""`upload_per_s_metrics_on` and `upload_per_s_tracing_on`: what observing the gateway costs.

Three gateways of the same build on the same PostgreSQL and Redis, each GATEWAY_PROCESSES
processes, driven in turn by the same 32 clients as `bench.upload`, their runs interleaved
(the machine drifts): one with metrics and tracing off (the baseline), one with metrics on
(GATEWAY_METRICS_ADDRESS, scraped by nobody: serving a scrape is not per call), and one with
tracing on at full sampling (`OTEL_TRACES_SAMPLER=always_on`), exporting over OTLP/HTTP to a
receiver in this process. Metrics have a target (at most 5% slower, ratio >= 0.95); tracing's
cost is reported. The harvest side of the same comparison is not measured yet.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from bench.common import Options, say
from bench.report import Figure, median, percentile
from bench.services import environment, gateway, postgres_database, redis_namespace
from bench.upload import GATEWAY_PROCESSES, Run, _Clients
from tests.support.otlp import OtlpReceiver
from tests.support.processes import free_consecutive_ports, free_port

WARM_UPLOADS = 1_000
UPLOADS_PER_RUN = 3_000


def _p99_ms(runs: list[Run]) -> float:
    return median([percentile(latencies, 0.99) * 1000 for _, latencies in runs])


def run(options: Options) -> list[Figure]:
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
            order = list(clients)
            for index in range(options.runs):
                # A different one first each run: the first of a round has met a slower machine.
                for variant in order[index % len(order) :] + order[: index % len(order)]:
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
    ]

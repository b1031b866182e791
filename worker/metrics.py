"""What a worker process counts for Prometheus: tasks, fetches, parses, stores; and the queue.

Labels are few and bounded: a task's outcome, an HTTP status code, a queue's name; never a
page, a URL or a task id. The counters are module-level, as prometheus-client intends, and
cost a lock and an add each, a few per page; they are served only when WORKER_METRICS_ADDRESS
is set (`instrument` at the worker process's start, `serve` once it is ready).

The queue's depth (messages waiting in the broker) is read at each scrape, not counted: the
broker knows it, the worker does not. Every worker that serves metrics reports the same
queue, so aggregate it with `max by (queue)`, not `sum`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
from amqp.exceptions import NotFound
from celery import Celery, signals
from kombu.exceptions import ChannelError
from kombu.transport import virtual
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from core.metrics import MetricsEndpoint, serve_metrics

log = logging.getLogger(__name__)

# Outcomes of one run of a task (a retried task counts one "retry" per try that failed).
SUCCESS, FAILURE, RETRY, REVOKED = "success", "failure", "retry", "revoked"
# From a fast local site to the fetch timeout and the task's time limit.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

TASKS = Counter(
    "harvester_worker_tasks",
    "Runs of harvest tasks that ended, by outcome (success, failure, retry, revoked).",
    ["outcome"],
)
TASK_SECONDS = Histogram(
    "harvester_worker_task_duration_seconds",
    "How long one run of a harvest task took, its own records included.",
    buckets=SECONDS_BUCKETS,
)
FETCHES = Counter(
    "harvester_worker_fetches",
    "HTTP responses the worker received from the source, by status code (redirects included).",
    ["code"],
)
FETCH_SECONDS = Histogram(
    "harvester_worker_fetch_duration_seconds",
    "How long fetching one listing page took, redirects and body included, failed ones too "
    "(a request held back before it left is not a fetch).",
    buckets=SECONDS_BUCKETS,
)
FETCHED_BYTES = Counter(
    "harvester_worker_fetched_bytes",
    "Bytes of listing pages fetched (bodies, after decompression).",
)
ITEMS_PARSED = Counter(
    "harvester_worker_items_parsed",
    "Projects found on fetched listing pages.",
)
ITEMS_SKIPPED = Counter(
    "harvester_worker_items_skipped",
    "Items of listing pages that could not be stored (no title, no http(s) link, link too long).",
)
PROJECTS_CREATED = Counter(
    "harvester_worker_projects_created",
    "Project rows a harvest created.",
)
PROJECTS_UPDATED = Counter(
    "harvester_worker_projects_updated",
    "Project rows a harvest changed.",
)
PARSE_SECONDS = Histogram(
    "harvester_worker_parse_duration_seconds",
    "How long parsing one listing page took.",
    buckets=SECONDS_BUCKETS,
)
STORE_SECONDS = Histogram(
    "harvester_worker_store_duration_seconds",
    "How long storing one page's projects took (every batch's upsert).",
    buckets=SECONDS_BUCKETS,
)


def task_ended(outcome: str) -> None:
    TASKS.labels(outcome).inc()


def page_counted(*, found: int, skipped: int, created: int, updated: int) -> None:
    ITEMS_PARSED.inc(found)
    ITEMS_SKIPPED.inc(skipped)
    PROJECTS_CREATED.inc(created)
    PROJECTS_UPDATED.inc(updated)


async def _count_response(response: httpx.Response) -> None:
    FETCHES.labels(str(response.status_code)).inc()


def count_responses(client: httpx.AsyncClient) -> None:
    """Count every response `client` receives by status code (an httpx response hook: the
    status is known there, before the body is read, whatever the fetch then makes of it)."""
    client.event_hooks["response"].append(_count_response)


class QueueDepthCollector(Collector):
    """`harvester_queue_messages`: messages waiting in the task queue, asked of the broker at
    each scrape (a declare: LLEN on Redis, the queue's message count on AMQP)."""

    def __init__(self, app: Celery, queue: str) -> None:
        self._app = app
        self._queue = queue

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "harvester_queue_messages",
            "Messages waiting in the broker's task queue (not yet taken by a worker).",
            labels=["queue"],
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without it, registering would call `collect`, and so the broker, at start-up.
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        try:
            with self._app.connection_for_read() as connection:
                channel: Any = connection.default_channel  # kombu's stubs lack queue_declare
                # kombu's Redis transport answers a passive declare with EXISTS, which it does
                # not give REDIS_KEY_PREFIX (global_keyprefix): every queue read as missing, so
                # 0. Its plain declare writes nothing (a Redis list exists while it holds
                # messages) and counts with LLEN, which it does prefix. On AMQP a plain
                # declare would create the queue, so there it stays passive.
                passive = not isinstance(channel, virtual.Channel)
                declared = channel.queue_declare(self._queue, passive=passive)
            family.add_metric([self._queue], float(declared.message_count))
        except (ChannelError, NotFound):
            # Redis keeps no empty list, and an AMQP queue not declared yet holds nothing.
            family.add_metric([self._queue], 0.0)
        except Exception as exc:  # a scrape must answer even when the broker does not
            log.warning("could not read the depth of queue %s: %r", self._queue, exc)
        yield family


class _TaskTimer:
    """Times each run of a task from Celery's prerun to its postrun signal (its thread's)."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def prerun(self, task_id: str, **_: Any) -> None:
        self._started[task_id] = time.perf_counter()

    def postrun(self, task_id: str, **_: Any) -> None:
        started = self._started.pop(task_id, None)
        if started is not None:
            TASK_SECONDS.observe(time.perf_counter() - started)


def instrument(client: httpx.AsyncClient) -> None:
    """Count `client`'s responses and time every task run, from the process's start on."""
    count_responses(client)
    timer = _TaskTimer()
    signals.task_prerun.connect(timer.prerun, weak=False)
    signals.task_postrun.connect(timer.postrun, weak=False)


def serve(app: Celery, address: str, queue: str) -> MetricsEndpoint:
    """Serve this worker process's metrics, the depth of `queue` among them, on `address`."""
    REGISTRY.register(QueueDepthCollector(app, queue))
    return serve_metrics(address, "worker")

"""Prometheus metrics: two gateway processes and a worker, scraped by a real Prometheus.

The tests do known things (Uploads that succeed, are refused or are invalid; a page that
succeeds, one that is retried after a 503, one that fails on a 404; Uploads while the broker
is down; messages left waiting with no worker on their queue) and read back through
Prometheus's query API that the counts by status code and by outcome, the failed publishes,
the health gauge and the queue's depth are exactly those, added up over the gateway's
processes (one metrics port each). `promtool check metrics` has nothing to say about either
endpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from projects.v1 import queue_service_pb2, queue_service_pb2_grpc, task_pb2
from tests.support.processes import RedisServer, free_consecutive_ports, free_port, poll_until
from tests.support.prometheus import Prometheus, promtool_check, running_prometheus, tool
from tests.support.stack import TEST_TOKEN, Stack, upload, wait_for_task

pytestmark = pytest.mark.timeout(180)


def _upload(address: str, page: int, token: str = TEST_TOKEN) -> Any:
    """Upload on a connection of its own, which the kernel hands to either gateway process."""
    with grpc.insecure_channel(address) as channel:
        stub = queue_service_pb2_grpc.QueueServiceStub(channel)
        try:
            return stub.Upload(
                queue_service_pb2.UploadRequest(page=page),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            ).task
        except grpc.RpcError as error:
            return error.code()


# (PromQL, the label its samples are told apart by) -> {label value: number}.
Expected = dict[tuple[str, str], dict[str, float]]


def _seen(prometheus: Prometheus, expected: Expected) -> Expected:
    return {(query, label): prometheus.by_label(query, label) for query, label in expected}


def test_prometheus_scrapes_what_the_stack_did(redis_stack: Stack, tmp_path: Path) -> None:
    tool("prometheus")  # skip (fail on CI) before starting anything without it
    gateway_port, metrics_port = free_port(), free_consecutive_ports(2)
    gateway = redis_stack.start_gateway(
        GATEWAY_PROCESSES="2",
        GATEWAY_ADDRESS=f"127.0.0.1:{gateway_port}",
        GATEWAY_METRICS_ADDRESS=f"127.0.0.1:{metrics_port}",
    )
    output = gateway.process.output
    poll_until(
        lambda: output().count("gateway metrics on") == 2 or gateway.process.popen.poll(),
        60,
        what="2 gateway processes serving metrics",
    )
    assert gateway.process.popen.poll() is None, output()
    worker = redis_stack.start_worker(WORKER_METRICS_ADDRESS="127.0.0.1:0")
    worker_url = worker.wait_for_line(r"worker metrics on (http://\S+)").group(1)

    site = redis_stack.site
    site.script(2, [{"status": 503}])  # then the sample page: one retry, then success
    site.script(3, [{"status": 404}])  # a permanent failure
    address = f"127.0.0.1:{gateway_port}"
    tasks = [_upload(address, page) for page in (1, 2, 3)]
    assert all(isinstance(task, task_pb2.Task) for task in tasks), tasks
    assert _upload(address, 0) == grpc.StatusCode.INVALID_ARGUMENT
    assert _upload(address, 1, token="not-a-token") == grpc.StatusCode.UNAUTHENTICATED
    ended = [wait_for_task(gateway, task.id) for task in tasks]
    assert [task.status for task in ended] == [
        task_pb2.TASK_STATUS_SUCCESS,
        task_pb2.TASK_STATUS_SUCCESS,
        task_pb2.TASK_STATUS_FAILURE,
    ]
    created = sum(task.result.created for task in ended)
    assert created > 0
    # The two listing pages as the worker read them (bodies, decompressed; the site's scripts
    # are used up, so it serves them as it did the second time).
    page_bytes = sum(
        len(httpx.get(redis_stack.site.source_url.format(page=page), timeout=10).content)
        for page in (1, 2)
    )

    gateway_targets = [f"127.0.0.1:{metrics_port + i}" for i in range(2)]
    worker_target = httpx.URL(worker_url).netloc.decode()
    with running_prometheus(
        tmp_path / "prometheus", {"gateway": gateway_targets, "worker": [worker_target]}
    ) as prometheus:
        queue = redis_stack.env["TASK_QUEUE"]
        expected: Expected = {
            ('sum by (grpc_code) (grpc_server_handled_total{grpc_method="Upload"})', "grpc_code"): {
                "OK": 3.0,
                "INVALID_ARGUMENT": 1.0,
                "UNAUTHENTICATED": 1.0,
            },
            ('sum by (job) (grpc_server_handling_seconds_count{grpc_method="Upload"})', "job"): {
                "gateway": 5.0
            },
            ("sum by (job) (harvester_gateway_tasks_published_total)", "job"): {"gateway": 3.0},
            ("sum by (job) (harvester_gateway_serving)", "job"): {"gateway": 2.0},
            ("sum by (outcome) (harvester_worker_tasks_total)", "outcome"): {
                "success": 2.0,
                "retry": 1.0,
                "failure": 1.0,
            },
            ("sum by (code) (harvester_worker_fetches_total)", "code"): {
                "200": 2.0,
                "503": 1.0,
                # The missing page, and the site's robots.txt (it has none: no rules).
                "404": 2.0,
            },
            ("sum by (job) (harvester_worker_projects_created_total)", "job"): {
                "worker": float(created)
            },
            ("sum by (job) (harvester_worker_task_duration_seconds_count)", "job"): {"worker": 4.0},
            # Every page fetch: page 1, page 2's 503 and 200, page 3's 404 (robots.txt aside).
            ("sum by (job) (harvester_worker_fetch_duration_seconds_count)", "job"): {
                "worker": 4.0
            },
            ("sum by (job) (harvester_worker_fetched_bytes_total)", "job"): {
                "worker": float(page_bytes)
            },
            ("sum by (job) (harvester_worker_items_parsed_total)", "job"): {
                "worker": float(sum(task.result.found for task in ended))
            },
            ("sum by (job) (harvester_worker_items_skipped_total)", "job"): {
                "worker": float(sum(task.result.skipped for task in ended))
            },
            ("sum by (job) (harvester_worker_projects_updated_total)", "job"): {
                "worker": float(sum(task.result.updated for task in ended))
            },
            # Parsed and stored: the two pages that were fetched whole.
            ("sum by (job) (harvester_worker_parse_duration_seconds_count)", "job"): {
                "worker": 2.0
            },
            ("sum by (job) (harvester_worker_store_duration_seconds_count)", "job"): {
                "worker": 2.0
            },
            ("max by (queue) (harvester_queue_messages)", "queue"): {queue: 0.0},
        }
        try:
            poll_until(
                lambda: _seen(prometheus, expected) == expected,
                30,
                0.25,
                what="the scraped counts",
            )
        except TimeoutError:
            pytest.fail(f"Prometheus shows {_seen(prometheus, expected)}, expected {expected}")
        up = prometheus.targets_up()
        assert sorted(up.values()) == ["up"] * 3, up

    for url in [f"http://{target}/metrics" for target in gateway_targets] + [worker_url]:
        exposition = httpx.get(url, timeout=10).text
        assert "grpc_server_handled_total" in exposition or "harvester_worker" in exposition
        assert promtool_check(exposition) == "", (url, promtool_check(exposition))


def _gateway_with_metrics(stack: Stack) -> tuple[str, str]:
    """A one-process gateway serving metrics: (its gRPC address, its metrics target)."""
    metrics_target = f"127.0.0.1:{free_port()}"
    gateway = stack.start_gateway(GATEWAY_METRICS_ADDRESS=metrics_target)
    gateway.process.wait_for_line(r"gateway metrics on")
    return gateway.address, metrics_target


def _until_seen(prometheus: Prometheus, expected: Expected, what: str) -> None:
    try:
        poll_until(lambda: _seen(prometheus, expected) == expected, 30, 0.25, what=what)
    except TimeoutError:
        pytest.fail(f"{what}: Prometheus shows {_seen(prometheus, expected)}, expected {expected}")


def test_publish_failures_and_health_while_the_broker_is_down(
    redis_stack: Stack, own_redis: RedisServer, tmp_path: Path
) -> None:
    tool("prometheus")
    address, target = _gateway_with_metrics(redis_stack)
    failures = ("sum by (job) (harvester_gateway_publish_failures_total)", "job")
    published = ("sum by (job) (harvester_gateway_tasks_published_total)", "job")
    serving = ("sum by (job) (harvester_gateway_serving)", "job")
    unavailable = (
        'sum by (grpc_code) (grpc_server_handled_total{grpc_method="Upload",'
        'grpc_code="UNAVAILABLE"})',
        "grpc_code",
    )
    with running_prometheus(tmp_path / "prometheus", {"gateway": [target]}) as prometheus:
        assert isinstance(_upload(address, 1), task_pb2.Task)
        _until_seen(
            prometheus,
            {failures: {"gateway": 0.0}, published: {"gateway": 1.0}, serving: {"gateway": 1.0}},
            "one publish, health SERVING",
        )

        own_redis.stop()
        refused = [_upload(address, page) for page in (2, 3, 4)]
        assert refused == [grpc.StatusCode.UNAVAILABLE] * 3
        # Health turns NOT_SERVING once the gateway's broker check fails (the failed publishes
        # tell it too), and the gauge follows at the next scrape.
        _until_seen(
            prometheus,
            {
                failures: {"gateway": 3.0},
                published: {"gateway": 1.0},
                serving: {"gateway": 0.0},
                unavailable: {"UNAVAILABLE": 3.0},
            },
            "three failed publishes, health NOT_SERVING",
        )

        own_redis.start()
        _until_seen(prometheus, {serving: {"gateway": 1.0}}, "health SERVING again")
        assert isinstance(_upload(address, 5), task_pb2.Task)
        _until_seen(
            prometheus,
            {failures: {"gateway": 3.0}, published: {"gateway": 2.0}},
            "a publish after the broker's return",
        )


def test_queue_depth_is_the_number_of_messages_waiting(redis_stack: Stack, tmp_path: Path) -> None:
    tool("prometheus")
    gateway = redis_stack.start_gateway()
    queue = redis_stack.env["TASK_QUEUE"]
    # A worker that serves metrics (the queue depth is the worker's to report) but consumes
    # another queue, so nothing takes the messages of ours: they wait in the broker.
    watcher = redis_stack.start_worker(
        "watcher", options=["--queues", f"{queue}-elsewhere"], WORKER_METRICS_ADDRESS="127.0.0.1:0"
    )
    watcher_url = watcher.wait_for_line(r"worker metrics on (http://\S+)").group(1)
    depth = ("max by (queue) (harvester_queue_messages)", "queue")
    with running_prometheus(
        tmp_path / "prometheus", {"worker": [httpx.URL(watcher_url).netloc.decode()]}
    ) as prometheus:
        _until_seen(prometheus, {depth: {queue: 0.0}}, "an empty queue")
        tasks = [upload(gateway, page) for page in (1, 2, 3)]
        queue_key = redis_stack.env["REDIS_KEY_PREFIX"] + queue
        client = redis.Redis.from_url(redis_stack.env["CELERY_BROKER_URL"])
        try:
            assert client.llen(queue_key) == 3
        finally:
            client.close()
        _until_seen(prometheus, {depth: {queue: 3.0}}, "three messages waiting")

        redis_stack.start_worker()  # consumes ours: the messages leave the queue
        ended = [wait_for_task(gateway, task.id) for task in tasks]
        assert [task.status for task in ended] == [task_pb2.TASK_STATUS_SUCCESS] * 3
        _until_seen(prometheus, {depth: {queue: 0.0}}, "the queue drained")

"""Prometheus metrics: two gateway processes and a worker, scraped by a real Prometheus.

The test does known things (Uploads that succeed, are refused or are invalid; a page that
succeeds, one that is retried after a 503, one that fails on a 404) and reads back through
Prometheus's query API that the counts by status code and by outcome are exactly those, added
up over the gateway's processes (one metrics port each). `promtool check metrics` has nothing
to say about either endpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from projects.v1 import queue_service_pb2, queue_service_pb2_grpc, task_pb2
from tests.support.processes import free_consecutive_ports, free_port, poll_until
from tests.support.prometheus import Prometheus, promtool_check, running_prometheus, tool
from tests.support.stack import TEST_TOKEN, Stack, wait_for_task

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
                "404": 1.0,
            },
            ("sum by (job) (harvester_worker_projects_created_total)", "job"): {
                "worker": float(created)
            },
            ("sum by (job) (harvester_worker_task_duration_seconds_count)", "job"): {"worker": 4.0},
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

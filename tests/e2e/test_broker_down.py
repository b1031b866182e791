"""The broker goes away and comes back: clear UNAVAILABLE, honest health, nothing half-done."""

from __future__ import annotations

import subprocess
import time

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2

from projects.v1 import queue_service_pb2, task_pb2
from tests.support.processes import BIN, RedisServer, poll_until
from tests.support.stack import Stack, rpc_detail, upload, wait_for_health, wait_for_task

PUBLISH_BOUND_SECONDS = 8.0  # PUBLISH_TIMEOUT_SECONDS (3) plus connect timeouts, with room


def retry_info(error: grpc.RpcError) -> error_details_pb2.RetryInfo:
    return rpc_detail(error, error_details_pb2.RetryInfo)


def test_broker_down_is_unavailable_then_recovers(
    redis_stack: Stack, own_redis: RedisServer
) -> None:
    gateway = redis_stack.start_gateway()
    redis_stack.start_worker()
    assert wait_for_task(gateway, upload(gateway, 1).id).status == task_pb2.TASK_STATUS_SUCCESS

    own_redis.stop()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        upload(gateway, 2, request_id="while-down")
    took = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert took < PUBLISH_BOUND_SECONDS, f"UNAVAILABLE took {took:.1f} s"
    assert "broker" in (caught.value.details() or "")
    assert retry_info(caught.value).retry_delay.seconds >= 1
    wait_for_health(gateway.address, health_pb2.HealthCheckResponse.NOT_SERVING, 10)

    # And as a person at a terminal sees it.
    seen = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-H", f"authorization: Bearer {gateway.token}",
         "-d", '{"page": 2}', gateway.address, "projects.v1.QueueService/Upload"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "Code: Unavailable" in seen.stderr
    assert "google.rpc.RetryInfo" in seen.stderr

    # A call whose deadline is shorter than the publish bound gets its deadline, not a hang.
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as short:
        gateway.stub.Upload(
            queue_service_pb2.UploadRequest(page=2),
            metadata=(("authorization", f"Bearer {gateway.token}"),),
            timeout=1.0,
        )
    assert short.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert time.monotonic() - started < 3

    # The abandoned call's publish runs to its end in the gateway; wait for it to give up so the
    # broker's return cannot race it (that task would then be enqueued, and rightly so).
    poll_until(
        lambda: gateway.process.output().count("publish of task") >= 3,
        15,
        0.1,
        "both publishes to fail",
    )
    own_redis.start()
    wait_for_health(gateway.address, health_pb2.HealthCheckResponse.SERVING, 20)
    queue_key = redis_stack.env["REDIS_KEY_PREFIX"] + redis_stack.env["TASK_QUEUE"]
    client = redis.Redis.from_url(own_redis.url)
    assert client.llen(queue_key) == 0, "a refused Upload left a message in the queue"
    client.close()

    # The same request_id now enqueues for real, and the worker resumes without a restart.
    task = upload(gateway, 2, request_id="while-down")
    done = wait_for_task(gateway, task.id, 60)
    assert done.status == task_pb2.TASK_STATUS_SUCCESS, done.error
    assert done.result.created == 10

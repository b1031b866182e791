"""The gateway as a process: its generated token, and its exit on SIGTERM."""

from __future__ import annotations

import re
import signal

from grpc_health.v1 import health_pb2

from projects.v1 import task_pb2
from tests.support.processes import Gateway
from tests.support.stack import Stack, upload, wait_for_health


def test_generated_token_is_printed_once_and_works(redis_stack: Stack) -> None:
    redis_stack.env["API_TOKENS"] = ""
    started = redis_stack.start_gateway()
    match = started.process.wait_for_line(r"grpcurl -plaintext -H 'authorization: Bearer (\S+)'")
    token = match.group(1)
    gateway = Gateway(started.process, started.address, token)
    try:
        assert upload(gateway, 1, token=token).status == task_pb2.TASK_STATUS_PENDING
        # Once on its own line and once in the grpcurl line of the banner, never in a log line.
        lines = [line for line in started.process.output().splitlines() if token in line]
        assert len(lines) == 2, lines
        assert not any(re.match(r"\d{4}-\d\d-\d\d ", line) for line in lines)
    finally:
        gateway.channel.close()


def test_sigterm_stops_serving_and_exits_zero(redis_stack: Stack) -> None:
    gateway = redis_stack.start_gateway()
    wait_for_health(gateway.address, health_pb2.HealthCheckResponse.SERVING)
    gateway.process.send(signal.SIGTERM)
    assert gateway.process.popen.wait(15) == 0
    output = gateway.process.output()
    assert "draining in-flight calls" in output
    assert "gateway stopped" in output

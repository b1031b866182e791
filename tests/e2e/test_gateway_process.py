"""The gateway as a process: its generated token, its exit on SIGTERM, GATEWAY_PROCESSES."""

from __future__ import annotations

import re
import signal

import grpc
import psutil
from grpc_health.v1 import health_pb2

from projects.v1 import queue_service_pb2, queue_service_pb2_grpc, task_pb2
from tests.support.processes import Gateway, free_port, poll_until
from tests.support.stack import TEST_TOKEN, Stack, upload, wait_for_health


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


def _start_processes(stack: Stack, count: int) -> tuple[Gateway, list[psutil.Process]]:
    """GATEWAY_PROCESSES=`count` on a fixed port; the parent and its listening children."""
    port = free_port()
    gateway = stack.start_gateway(GATEWAY_PROCESSES=str(count), GATEWAY_ADDRESS=f"127.0.0.1:{port}")
    output = gateway.process.output
    poll_until(
        lambda: output().count("gateway ready") == count or gateway.process.popen.poll(),
        60,
        what=f"{count} gateway processes listening and ready",
    )
    assert gateway.process.popen.poll() is None, output()
    children = psutil.Process(gateway.process.pid).children()
    assert len(children) == count
    for child in children:
        listening = {
            c.laddr.port for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN
        }
        assert port in listening, (child.pid, listening)
    return gateway, children


def test_gateway_processes_share_the_port_and_stop_together(redis_stack: Stack) -> None:
    gateway, children = _start_processes(redis_stack, 2)
    ids = set()
    for page in range(1, 9):  # a connection each, which the kernel spreads over the processes
        with grpc.insecure_channel(gateway.address) as channel:
            stub = queue_service_pb2_grpc.QueueServiceStub(channel)
            response = stub.Upload(
                queue_service_pb2.UploadRequest(page=page),
                metadata=(("authorization", f"Bearer {TEST_TOKEN}"),),
                timeout=10,
            )
        assert response.task.status == task_pb2.TASK_STATUS_PENDING
        ids.add(response.task.id)
    assert len(ids) == 8
    gateway.process.send(signal.SIGTERM)
    assert gateway.process.popen.wait(20) == 0
    assert not any(
        child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children
    )
    assert gateway.process.output().count("gateway stopped") == 2


def test_one_gateway_process_dying_stops_the_rest_and_fails(redis_stack: Stack) -> None:
    gateway, children = _start_processes(redis_stack, 2)
    children[0].kill()
    # Non-zero, so whatever runs the gateway restarts it whole.
    assert gateway.process.popen.wait(20) == 1
    assert f"gateway process {children[0].pid} exited" in gateway.process.output()
    children[1].wait(5)

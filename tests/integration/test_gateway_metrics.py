"""gateway.metrics.MetricsInterceptor on a real grpc.aio server: codes, latency, in flight, streams.

The health service stands in for ours: Check answers OK or NOT_FOUND (an abort), Watch is a
server stream that stays open until the client cancels it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from core.metrics import serve_metrics
from gateway.metrics import MetricsInterceptor, count_publishes

SERVICE = "grpc.health.v1.Health"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def settled(read: Callable[[], float], expected: float, what: str) -> None:
    """Until `read()` gives `expected`, for 5 s at most."""
    for _ in range(500):
        if read() == expected:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{what}: {read()} after 5 s, not {expected}")


def handled(method: str, code: str, kind: str = "unary") -> float:
    return sample(
        "grpc_server_handled_total",
        grpc_service=SERVICE,
        grpc_method=method,
        grpc_type=kind,
        grpc_code=code,
    )


@pytest.fixture
async def stub() -> AsyncIterator[health_pb2_grpc.HealthStub]:
    server = grpc.aio.server(interceptors=[MetricsInterceptor()])
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield health_pb2_grpc.HealthStub(channel)
    await server.stop(None)


async def test_calls_are_counted_by_method_and_status_code(
    stub: health_pb2_grpc.HealthStub,
) -> None:
    ok, not_found = handled("Check", "OK"), handled("Check", "NOT_FOUND")
    timed = sample(
        "grpc_server_handling_seconds_count",
        grpc_service=SERVICE,
        grpc_method="Check",
        grpc_type="unary",
    )

    for _ in range(3):
        await stub.Check(health_pb2.HealthCheckRequest(service=""))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))

    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    # The server counts a call as it finishes it, which may be a moment after its client has
    # the answer (an aborted call's status goes out before the handler's abort unwinds).
    await settled(lambda: sample("grpc_server_calls_in_flight"), 0, "calls in flight")
    assert handled("Check", "OK") - ok == 3
    assert handled("Check", "NOT_FOUND") - not_found == 1
    assert (
        sample(
            "grpc_server_handling_seconds_count",
            grpc_service=SERVICE,
            grpc_method="Check",
            grpc_type="unary",
        )
        - timed
        == 4
    )


async def test_an_open_stream_is_in_flight_until_it_is_cancelled(
    stub: health_pb2_grpc.HealthStub,
) -> None:
    cancelled = handled("Watch", "CANCELLED", "server_stream")
    call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await call.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING

    assert sample("harvester_gateway_watch_streams", grpc_method="Watch") == 1
    assert sample("grpc_server_calls_in_flight") == 1
    call.cancel()

    # The server sees the cancel a moment after the client sends it: wait, with a deadline.
    await settled(
        lambda: sample("harvester_gateway_watch_streams", grpc_method="Watch"), 0, "open streams"
    )
    await settled(lambda: sample("grpc_server_calls_in_flight"), 0, "calls in flight")
    assert handled("Watch", "CANCELLED", "server_stream") - cancelled == 1


def test_publishes_and_failures_are_counted_apart() -> None:
    sent = sample("harvester_gateway_tasks_published_total")
    failed = sample("harvester_gateway_publish_failures_total")

    count_publishes(sent=5, failed=2)

    assert sample("harvester_gateway_tasks_published_total") - sent == 5
    assert sample("harvester_gateway_publish_failures_total") - failed == 2


def test_the_endpoint_serves_the_registry_on_the_port_it_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="core.metrics")
    endpoint = serve_metrics("127.0.0.1:0", "test")
    try:
        assert endpoint.port > 0
        assert f"test metrics on {endpoint.url}" in caplog.text
        body = httpx.get(endpoint.url, timeout=5).text
        assert "# TYPE grpc_server_handled_total counter" in body
    finally:
        endpoint.close()

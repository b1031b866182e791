"""gateway.startup: StartingGate on a real grpc.aio server (127.0.0.1, a free port) answers
UNAVAILABLE with a RetryInfo until Startup is ready, lets health through meanwhile, and no
handler runs before; Startup waits out a database that refuses and raises what waiting won't cure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core.waiting import Backoff
from gateway.startup import StartingGate, Startup

SERVICE = "test.v1.Starting"


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    trailers: Any = error.trailing_metadata() or ()
    (packed,) = [value for key, value in trailers if key == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(packed)


@asynccontextmanager
async def serving(startup: Startup, ran: list[str]) -> AsyncIterator[grpc.aio.Channel]:
    async def unary(request: bytes, context: Any) -> bytes:
        ran.append("unary")
        return b"answered"

    server = grpc.aio.server(interceptors=[StartingGate(startup)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
            ),
        )
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # type: ignore[attr-defined]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close(None)
        await server.stop(None)


async def nothing() -> None:
    return None


async def test_calls_are_unavailable_with_retry_info_until_ready_and_health_is_open() -> None:
    startup = Startup(nothing)
    startup.waiting_for = "last try: ConnectionRefusedError"
    ran: list[str] = []
    async with serving(startup, ran) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Unary", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"hello", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting" in (caught.value.details() or "")
        assert "ConnectionRefusedError" in (caught.value.details() or "")
        details = rich_status(caught.value).details
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
        assert ran == []  # no handler ran before the gateway was ready
        # Health (and reflection) stay open: probes must see the NOT_SERVING it sets.
        check = health_pb2_grpc.HealthStub(channel).Check
        assert (await check(health_pb2.HealthCheckRequest(), timeout=10)).status == (
            health_pb2.HealthCheckResponse.SERVING  # this test's servicer is never told otherwise
        )

        await startup.run()
        assert await call(b"hello", timeout=10) == b"answered"
        assert ran == ["unary"]


async def test_startup_waits_out_a_refusing_database_and_notes_why() -> None:
    tries: list[int] = []

    async def prepare() -> None:
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionRefusedError("refused")

    startup = Startup(prepare, Backoff(first=0.01, longest=0.01))
    noted: list[str] = []
    original = startup._note

    def note(exc: BaseException) -> None:
        original(exc)
        noted.append(startup.waiting_for)

    startup._note = note  # type: ignore[method-assign]
    await startup.run()
    assert startup.ready and len(tries) == 3
    assert noted == ["last try: ConnectionRefusedError"] * 2


async def test_startup_raises_what_waiting_will_not_cure() -> None:
    async def prepare() -> None:
        raise RuntimeError("migration 0005 failed")

    startup = Startup(prepare, Backoff(first=0.01, longest=0.01))
    with pytest.raises(RuntimeError, match="0005"):
        await startup.run()
    assert not startup.ready

"""gateway.auth: `authenticate` and `TokenTable` alone, then `BearerAuthInterceptor` on a real
grpc.aio server (127.0.0.1, a free port) in front of handlers of all four kinds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from core.settings import ApiToken
from gateway.auth import (
    OPEN_SERVICES,
    BearerAuthInterceptor,
    Metadata,
    TokenTable,
    authenticate,
    current_client,
)
from gateway.contract import HEALTH_SERVICE_NAME
from gateway.errors import Unauthenticated
from gateway.ratelimit import RateLimiter

TOKENS = [
    ApiToken(name="alice", token="alice-token-0123456789"),
    ApiToken(name="bob", token="bob-token-9876543210"),
]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


# --- TokenTable ---------------------------------------------------------------------------------


def test_a_known_token_names_its_client() -> None:
    table = TokenTable(TOKENS)

    assert table.identify("alice-token-0123456789") == "alice"
    assert table.identify("bob-token-9876543210") == "bob"


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "alice",  # a client's name is not its token
        "alice-token-012345678",  # a prefix
        "alice-token-01234567890",  # a longer one
        "ALICE-TOKEN-0123456789",  # tokens are compared exactly
        "alice-token-0123456789 ",
    ],
)
def test_anything_else_names_nobody(presented: str) -> None:
    assert TokenTable(TOKENS).identify(presented) is None


def test_a_table_without_tokens_names_nobody() -> None:
    assert TokenTable([]).identify("alice-token-0123456789") is None


# --- authenticate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "Bearer alice-token-0123456789",
        "bearer alice-token-0123456789",  # the scheme in any case
        "BEARER alice-token-0123456789",
        "Bearer   alice-token-0123456789  ",  # spaces around the token
    ],
)
def test_a_bearer_token_in_the_authorization_metadata_names_the_client(value: str) -> None:
    metadata = (("user-agent", "grpc-python"), ("authorization", value))

    assert authenticate(metadata, TokenTable(TOKENS)) == "alice"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (None, "missing authorization"),
        ((), "missing authorization"),
        ((("x-authorization", "Bearer alice-token-0123456789"),), "missing authorization"),
        (
            (
                ("authorization", "Bearer alice-token-0123456789"),
                ("authorization", "Bearer bob-token-9876543210"),
            ),
            "more than one authorization header",
        ),
        ((("authorization", "alice-token-0123456789"),), "authorization is not a bearer token"),
        ((("authorization", "Basic YWxpY2U6c2VjcmV0"),), "authorization is not a bearer token"),
        ((("authorization", "Bearer"),), "authorization is not a bearer token"),
        (
            (("authorization", b"Bearer alice-token-0123456789"),),
            "authorization is not a bearer token",
        ),
        ((("authorization", "Bearer "),), "unknown token"),
        ((("authorization", "Bearer someone-elses-token"),), "unknown token"),
    ],
)
def test_a_call_without_a_good_token_is_unauthenticated_saying_why(
    metadata: Metadata | None, reason: str
) -> None:
    with pytest.raises(Unauthenticated) as caught:
        authenticate(metadata, TokenTable(TOKENS))

    assert caught.value.message.startswith(f"{reason}: ")
    # Every refusal says how to authenticate.
    assert "authorization: Bearer <token>" in caught.value.message
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_a_refusal_never_repeats_the_token_presented() -> None:
    with pytest.raises(Unauthenticated) as caught:
        authenticate(bearer("a-secret-someone-mistyped"), TokenTable(TOKENS))

    assert "a-secret-someone-mistyped" not in caught.value.message


# --- the interceptor on a real server -----------------------------------------------------------

SERVICE = "tests.auth.v1.Echo"
NOBODY = "<no client>"


def whoami() -> bytes:
    return current_client.get(NOBODY).encode()


@dataclass
class Calls:
    """The handlers that ran, with the client each saw."""

    seen: list[tuple[str, str]] = field(default_factory=list)

    def saw(self, kind: str) -> bytes:
        self.seen.append((kind, current_client.get(NOBODY)))
        return whoami()


def echo_handler(calls: Calls) -> grpc.GenericRpcHandler[Any, Any]:
    """SERVICE with one method of each kind; each answers with the client it sees."""

    async def unary_unary(request: bytes, context: Any) -> bytes:
        return calls.saw("unary_unary")

    async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield calls.saw("unary_stream")
        yield whoami()

    async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
        received = [request async for request in requests]
        assert received == [b"one", b"two"]
        return calls.saw("stream_unary")

    async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield calls.saw("stream_stream") + b" " + request

    # No (de)serializers: requests and responses are the bytes on the wire.
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )


@dataclass
class Served:
    channel: grpc.aio.Channel
    calls: Calls


@asynccontextmanager
async def serving(limiter: RateLimiter | None = None) -> AsyncIterator[Served]:
    """SERVICE, health and reflection behind the interceptor; a channel to them."""
    calls = Calls()
    limiter = limiter or RateLimiter(per_second=0, burst=1)  # a rate of 0: no limit
    server = grpc.aio.server(interceptors=[BearerAuthInterceptor(TokenTable(TOKENS), limiter)])
    server.add_generic_rpc_handlers((echo_handler(calls),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # type: ignore[attr-defined]
    reflection.enable_server_reflection(
        (SERVICE, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(channel, calls)
    finally:
        await channel.close(None)
        await server.stop(None)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as it:
        yield it


Call = Callable[[grpc.aio.Channel, Metadata | None], Any]


async def call_unary_unary(channel: grpc.aio.Channel, metadata: Metadata | None) -> list[bytes]:
    method = channel.unary_unary(f"/{SERVICE}/UnaryUnary", None, None)  # bytes, not messages
    return [await method(b"hello", metadata=metadata, timeout=10)]


async def call_unary_stream(channel: grpc.aio.Channel, metadata: Metadata | None) -> list[bytes]:
    method = channel.unary_stream(f"/{SERVICE}/UnaryStream", None, None)  # bytes, not messages
    return [response async for response in method(b"hello", metadata=metadata, timeout=10)]


async def call_stream_unary(channel: grpc.aio.Channel, metadata: Metadata | None) -> list[bytes]:
    method = channel.stream_unary(f"/{SERVICE}/StreamUnary", None, None)  # bytes, not messages
    return [await method(iter([b"one", b"two"]), metadata=metadata, timeout=10)]


async def call_stream_stream(channel: grpc.aio.Channel, metadata: Metadata | None) -> list[bytes]:
    method = channel.stream_stream(f"/{SERVICE}/StreamStream", None, None)  # bytes, not messages
    requests: Iterator[bytes] = iter([b"one", b"two"])
    return [response async for response in method(requests, metadata=metadata, timeout=10)]


def start_call(channel: grpc.aio.Channel, kind: str, metadata: Metadata | None) -> Any:
    """A call of `kind` begun, for its status; a streaming request sends no message at all.

    The refusal is decided by the metadata alone. (A client that writes to a call the server
    has already ended may lose the race in grpc-python and read INTERNAL, "Failed
    execute_batch", instead of the server's status.)
    """
    path = f"/{SERVICE}/{METHODS[kind]}"
    if kind == "unary_unary":
        return channel.unary_unary(path, None, None)(b"hello", metadata=metadata, timeout=10)
    if kind == "unary_stream":
        return channel.unary_stream(path, None, None)(b"hello", metadata=metadata, timeout=10)
    if kind == "stream_unary":
        return channel.stream_unary(path, None, None)(None, metadata=metadata, timeout=10)
    return channel.stream_stream(path, None, None)(None, metadata=metadata, timeout=10)


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    return await call.code(), await call.details()


METHODS = {
    "unary_unary": "UnaryUnary",
    "unary_stream": "UnaryStream",
    "stream_unary": "StreamUnary",
    "stream_stream": "StreamStream",
}
# Each kind's whole exchange, and its answers to a client, %s standing for the client's name.
KINDS = [
    pytest.param("unary_unary", call_unary_unary, [b"%s"], id="unary-unary"),
    pytest.param("unary_stream", call_unary_stream, [b"%s", b"%s"], id="unary-stream"),
    pytest.param("stream_unary", call_stream_unary, [b"%s"], id="stream-unary"),
    pytest.param("stream_stream", call_stream_stream, [b"%s one", b"%s two"], id="stream-stream"),
]


@pytest.mark.parametrize("kind", METHODS)
async def test_without_a_token_every_kind_of_call_is_unauthenticated(
    served: Served, kind: str
) -> None:
    code, details = await status_of(start_call(served.channel, kind, None))

    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert details.startswith("missing authorization: ")
    assert served.calls.seen == []  # the handler never ran


@pytest.mark.parametrize("kind", METHODS)
async def test_with_an_unknown_token_every_kind_of_call_is_unauthenticated(
    served: Served, kind: str
) -> None:
    call = start_call(served.channel, kind, bearer("not-a-token-of-ours"))
    code, details = await status_of(call)

    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert details.startswith("unknown token: ")
    assert served.calls.seen == []


@pytest.mark.parametrize(("kind", "call", "answers"), KINDS)
async def test_with_a_token_every_kind_of_handler_sees_the_client_s_name(
    served: Served, kind: str, call: Call, answers: list[bytes]
) -> None:
    assert await call(served.channel, bearer("alice-token-0123456789")) == [
        answer % b"alice" for answer in answers
    ]
    assert await call(served.channel, bearer("bob-token-9876543210")) == [
        answer % b"bob" for answer in answers
    ]
    seen = {client for _kind, client in served.calls.seen}
    assert seen == {"alice", "bob"}
    assert {seen_kind for seen_kind, _client in served.calls.seen} == {kind}


async def test_the_client_of_one_call_does_not_leak_into_the_next(served: Served) -> None:
    await call_unary_unary(served.channel, bearer("alice-token-0123456789"))
    with pytest.raises(grpc.aio.AioRpcError):
        await call_unary_unary(served.channel, None)

    assert served.calls.seen == [("unary_unary", "alice")]
    assert current_client.get(NOBODY) == NOBODY  # nor into the test's own context


def test_only_health_and_reflection_are_open() -> None:
    assert {HEALTH_SERVICE_NAME, reflection.SERVICE_NAME} == OPEN_SERVICES


async def test_health_answers_without_a_token(served: Served) -> None:
    stub = health_pb2_grpc.HealthStub(served.channel)

    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_answers_with_a_bad_token_too(served: Served) -> None:
    # A probe that sends a stale token is not locked out of the health check.
    stub = health_pb2_grpc.HealthStub(served.channel)

    response = await stub.Check(
        health_pb2.HealthCheckRequest(), metadata=bearer("stale"), timeout=10
    )

    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services_without_a_token(served: Served) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    responses = [response async for response in stub.ServerReflectionInfo(iter([request]))]

    (answer,) = responses
    names = {service.name for service in answer.list_services_response.service}
    assert names == {SERVICE, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME}


async def test_an_exhausted_rate_limit_is_resource_exhausted_with_when_to_retry() -> None:
    # One call, then one per 1,000 s: the second call is refused; health never is.
    async with serving(RateLimiter(per_second=0.001, burst=1)) as served:
        assert await call_unary_unary(served.channel, bearer("alice-token-0123456789")) == [
            b"alice"
        ]
        refused = start_call(served.channel, "stream_stream", bearer("alice-token-0123456789"))
        code, details = await status_of(refused)
        trailers = await refused.trailing_metadata()
        # Bob has a bucket of his own.
        assert await call_unary_unary(served.channel, bearer("bob-token-9876543210")) == [b"bob"]
        stub = health_pb2_grpc.HealthStub(served.channel)
        for _ in range(3):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("rate limit of client 'alice' reached; retry in ")
    (packed,) = [value for key, value in trailers if key == "grpc-status-details-bin"]
    status = status_pb2.Status.FromString(packed)
    (detail,) = status.details
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry)
    assert 990 <= retry.retry_delay.seconds <= 1000
    assert served.calls.seen == [("unary_unary", "alice"), ("unary_unary", "bob")]

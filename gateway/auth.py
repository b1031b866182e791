"""Bearer-token authentication (and the per-client rate limit) of QueueService calls.

Handlers never see tokens: the interceptor checks `authorization: Bearer <token>` against
API_TOKENS in constant time, applies the client's rate limit, and puts the client's name in
`current_client` for the call. Health and reflection stay open so probes and `grpcurl list`
need no token.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from core.settings import ApiToken
from gateway.contract import QUEUE_SERVICE_NAME
from gateway.errors import ResourceExhausted, ServiceError, Unauthenticated, to_status
from gateway.ratelimit import RateLimiter

Metadata = Sequence[tuple[str, str | bytes]]
current_client: contextvars.ContextVar[str] = contextvars.ContextVar("current_client")

PROTECTED_PREFIX = f"/{QUEUE_SERVICE_NAME}/"
_SCHEME = "bearer "
_HOW = "send metadata 'authorization: Bearer <token>' with a token from the gateway's API_TOKENS"


class TokenTable:
    """Known tokens; `identify` returns the client name for a presented token, in constant time."""

    def __init__(self, tokens: Sequence[ApiToken]) -> None:
        self._tokens = [(t.name, t.token.encode()) for t in tokens]

    def identify(self, presented: str) -> str | None:
        candidate = presented.encode()
        found: str | None = None
        # Compare against every token, without stopping early, so timing tells nothing.
        for name, token in self._tokens:
            if hmac.compare_digest(candidate, token):
                found = name
        return found


def authenticate(metadata: Metadata | None, table: TokenTable) -> str:
    """The client named by the call's `authorization` metadata, or Unauthenticated saying why."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        raise Unauthenticated(f"missing authorization: {_HOW}")
    if len(values) > 1:
        raise Unauthenticated(f"more than one authorization header: {_HOW}")
    value = values[0]
    if isinstance(value, bytes) or not value.lower().startswith(_SCHEME):
        raise Unauthenticated(f"authorization is not a bearer token: {_HOW}")
    client = table.identify(value[len(_SCHEME) :].strip())
    if client is None:
        raise Unauthenticated(f"unknown token: {_HOW}")
    return client


# The stubs make these generic; the runtime classes are not subscriptable.
if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    _Interceptor: TypeAlias = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor


class BearerAuthInterceptor(_Interceptor):
    def __init__(self, table: TokenTable, limiter: RateLimiter | None = None) -> None:
        self._table = table
        self._limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROTECTED_PREFIX):
            return handler
        try:
            client = authenticate(handler_call_details.invocation_metadata, self._table)
            wait = self._limiter.acquire(client) if self._limiter is not None else 0.0
            if wait > 0:
                raise ResourceExhausted(
                    f"rate limit of client {client!r} reached; retry in {wait:.2f} s", wait
                )
        except ServiceError as error:
            return _refusal(handler, error)
        return _as_client(handler, client)


def _as_client(handler: Handler, client: str) -> Handler:
    # The aio server awaits what the handler returns; the sync-typed stubs do not know that.
    inner: Any = handler.unary_unary

    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        current_client.set(client)
        return await inner(request, context)

    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refusal(handler: Handler, error: ServiceError) -> Handler:
    status = to_status(error)

    async def behavior(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )

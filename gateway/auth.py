"""Bearer-token authentication (and the per-client rate limit) of every call but health's.

Handlers never see tokens: the interceptor checks `authorization: Bearer <token>` against
API_TOKENS in constant time, applies the client's rate limit, and puts the client's name in
`current_client` for the call, for handlers of all four kinds (unary or streaming, either
way). Health and reflection stay open so probes and `grpcurl list` need no token; every other
service is protected, including ones added later.
"""

from __future__ import annotations

import contextvars
import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection

from core.settings import ApiToken
from gateway.contract import HEALTH_SERVICE_NAME
from gateway.errors import ResourceExhausted, ServiceError, Unauthenticated, to_status
from gateway.handlers import Behavior, Handler, Interceptor, service_of, with_behavior
from gateway.ratelimit import RateLimiter

Metadata = Sequence[tuple[str, str | bytes]]
current_client: contextvars.ContextVar[str] = contextvars.ContextVar("current_client")

OPEN_SERVICES = frozenset((HEALTH_SERVICE_NAME, reflection.SERVICE_NAME))
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


class BearerAuthInterceptor(Interceptor):
    def __init__(self, table: TokenTable, limiter: RateLimiter) -> None:
        self._table = table
        self._limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or service_of(handler_call_details.method) in OPEN_SERVICES:
            return handler
        try:
            client = authenticate(handler_call_details.invocation_metadata, self._table)
            wait = self._limiter.acquire(client)
            if wait > 0:
                raise ResourceExhausted(
                    f"rate limit of client {client!r} reached; retry in {wait:.2f} s", wait
                )
        except ServiceError as error:
            return _refusal(handler, error)
        return _as_client(handler, client)


def _as_client(handler: Handler, client: str) -> Handler:
    def make(inner: Behavior) -> Behavior:
        # The aio server awaits what a behaviour returns, or iterates it when it is an async
        # generator (a streaming answer); the wrapper must be of the same sort.
        if inspect.isasyncgenfunction(inner):

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                current_client.set(client)
                async for response in inner(request, context):
                    yield response

            return streaming

        async def behavior(request: Any, context: Any) -> Any:
            current_client.set(client)
            return await inner(request, context)

        return behavior

    return with_behavior(handler, make)


def _refusal(handler: Handler, error: ServiceError) -> Handler:
    status = to_status(error)

    async def behavior(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    return with_behavior(handler, lambda _inner: behavior)

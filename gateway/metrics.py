"""What the gateway counts for Prometheus: its calls, its open streams, its publishes, its health.

The call metrics take the names of the gRPC ecosystem's server metrics (`grpc_server_*`, as
go-grpc-middleware's Prometheus interceptors name them), labelled by service, method, kind and
status code: all bounded by the contract, never by what a client sends. `MetricsInterceptor`
is installed only when GATEWAY_METRICS_ADDRESS is set, so a gateway without metrics does no
per-call work for them; the per-batch publish counters cost nothing worth switching off.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from core.metrics import MetricsEndpoint, serve_metrics
from gateway.handlers import Behavior, Handler, Interceptor, service_of, with_behavior

# From a millisecond (an Upload on a quiet gateway) to the publish timeout and beyond.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

HANDLED = Counter(
    "grpc_server_handled",
    "gRPC calls the gateway finished, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "How long the gateway took over a call, by method (for a stream: how long it was open).",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "grpc_server_calls_in_flight",
    "gRPC calls the gateway is serving now (GATEWAY_MAX_CONCURRENT_RPCS bounds them).",
)
WATCH_STREAMS = Gauge(
    "harvester_gateway_watch_streams",
    "Server-streaming calls (WatchProjects, WatchBatch, ...) open now, by method.",
    ["grpc_method"],
)
TASKS_PUBLISHED = Counter(
    "harvester_gateway_tasks_published",
    "Harvest tasks the gateway handed to the broker.",
)
PUBLISH_FAILURES = Counter(
    "harvester_gateway_publish_failures",
    "Harvest tasks the gateway could not hand to the broker in time (their Upload answered "
    "UNAVAILABLE).",
)
SERVING = Gauge(
    "harvester_gateway_serving",
    "1 while the gateway's health is SERVING (broker and database answer), else 0.",
)


def interceptors(enabled: bool) -> list[Interceptor]:
    """The metrics interceptor when metrics are on; none, and no per-call cost, when off."""
    return [MetricsInterceptor()] if enabled else []


def serve_gateway_metrics(address: str, serving: Callable[[], bool | None]) -> MetricsEndpoint:
    track_health(serving)
    return serve_metrics(address, "gateway")


def count_publishes(sent: int, failed: int) -> None:
    TASKS_PUBLISHED.inc(sent)
    PUBLISH_FAILURES.inc(failed)


def track_health(serving: Callable[[], bool | None]) -> None:
    """Read the health state at each scrape (None, not checked yet, reads as 0)."""
    SERVING.set_function(lambda: 1.0 if serving() else 0.0)


def _kind(handler: Handler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


@dataclass
class _MethodMetrics:
    """A method's label children, looked up once per method instead of once per call."""

    service: str
    method: str
    kind: str
    handling: Any
    streams: Any | None
    by_code: dict[grpc.StatusCode, Any] = field(default_factory=dict)

    def finished(self, code: grpc.StatusCode, seconds: float) -> None:
        counter = self.by_code.get(code)
        if counter is None:
            counter = HANDLED.labels(self.service, self.method, self.kind, code.name)
            self.by_code[code] = counter
        counter.inc()
        self.handling.observe(seconds)


def _code_of(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> Any:
    """The status a call ended with: the one it set or aborted with, else what its end implies."""
    # Cancelled by the client (or the server's stop); a stream's reader went away.
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None:
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class MetricsInterceptor(Interceptor):
    """Counts every call the gateway serves; first in the chain, so refusals count too."""

    def __init__(self) -> None:
        self._methods: dict[str, _MethodMetrics] = {}

    def _metrics_for(self, path: str, handler: Handler) -> _MethodMetrics:
        found = self._methods.get(path)
        if found is None:
            service, method, kind = service_of(path), path.rpartition("/")[2], _kind(handler)
            found = _MethodMetrics(
                service,
                method,
                kind,
                HANDLING_SECONDS.labels(service, method, kind),
                WATCH_STREAMS.labels(method) if handler.response_streaming else None,
            )
            self._methods[path] = found
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED, not counted
            return handler
        metrics = self._metrics_for(handler_call_details.method, handler)
        return with_behavior(handler, lambda inner: _measured(inner, metrics))


def _begin(metrics: _MethodMetrics) -> float:
    IN_FLIGHT.inc()
    if metrics.streams is not None:
        metrics.streams.inc()
    return time.perf_counter()


def _end(
    metrics: _MethodMetrics, context: Any, error: BaseException | None, started: float
) -> None:
    IN_FLIGHT.dec()
    if metrics.streams is not None:
        metrics.streams.dec()
    metrics.finished(_code_of(context, error), time.perf_counter() - started)


def _measured(inner: Behavior, metrics: _MethodMetrics) -> Behavior:
    # Of the same sort as `inner` (see gateway.auth): the aio server awaits a coroutine and
    # iterates an async generator.
    if inspect.isasyncgenfunction(inner):

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            started = _begin(metrics)
            error: BaseException | None = None
            try:
                async for response in inner(request, context):
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                _end(metrics, context, error, started)

        return streaming

    async def behavior(request: Any, context: Any) -> Any:
        started = _begin(metrics)
        error: BaseException | None = None
        try:
            return await inner(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _end(metrics, context, error, started)

    return behavior

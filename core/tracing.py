"""OpenTelemetry tracing of a harvest, from the Upload call to the rows stored: off unless asked.

With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, a process
exports its spans over OTLP/HTTP there; the SDK reads the other standard variables itself
(`OTEL_TRACES_SAMPLER` and its argument, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`). `OTEL_TRACES_EXPORTER=none` and
`OTEL_SDK_DISABLED=true` turn it off again, endpoint or not, as the specification has them do.
Off, the SDK and the instrumentations are not even imported: the API's tracer is a no-op, and
the hot path asks `enabled()` before any tracing work.

One trace runs: the gateway's server span for the Upload (the grpc instrumentation) -> the
publish of its message (a producer span, whose W3C `traceparent` travels in the Celery
message's headers) -> each try of the worker's task (the celery instrumentation; a retry's
message carries the try that sent it) -> the fetch (httpx's span, with the HTTP status) ->
the parse and the store (spans of ours, with the page and the row counts) -> the statements
(SQLAlchemy's spans).
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from sqlalchemy.ext.asyncio import AsyncEngine

from core.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

T = TypeVar("T")

TRACER_NAME = "projects-harvester"
# Span attributes of ours (OpenTelemetry's own conventions name the HTTP and database ones).
PAGE = "harvester.page"
ITEMS_FOUND = "harvester.items.found"
ITEMS_SKIPPED = "harvester.items.skipped"
PROJECTS_CREATED = "harvester.projects.created"
PROJECTS_UPDATED = "harvester.projects.updated"
TRY = "harvester.try"  # 1 for the first try of a task, 2 for its first retry, ...

_enabled = False


def enabled() -> bool:
    """Whether this process exports traces (`configure` installed the SDK)."""
    return _enabled


def configure(settings: Settings, service_name: str) -> bool:
    """Install the SDK with an OTLP exporter when traces are to be exported (an endpoint set,
    and not turned off by OTEL_TRACES_EXPORTER=none or OTEL_SDK_DISABLED=true); whether it did."""
    global _enabled  # noqa: PLW0603  (one provider per process, as the API's global is)
    if _enabled or not settings.traces_exported:
        return _enabled
    # Imported only once tracing is on (here and below): without it no process loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    provider = TracerProvider(resource=_resource(service_name))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


def _resource(service_name: str) -> Resource:
    """The SDK's resource from the environment, named `service_name` unless the environment
    names it (OTEL_SERVICE_NAME, or service.name in OTEL_RESOURCE_ATTRIBUTES)."""
    from opentelemetry.sdk.resources import SERVICE_NAME  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource as SdkResource  # noqa: PLC0415

    # Resource.create's own attributes win over the environment's, so ours go in only where
    # the SDK found no name and fell back to its "unknown_service".
    detected = SdkResource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return detected.merge(SdkResource({SERVICE_NAME: service_name}))
    return detected


def grpc_server_interceptors() -> list[Any]:
    """OpenTelemetry's grpc.aio server interceptor when tracing is on; else none, at no cost."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor  # noqa: PLC0415

    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]


def instrument_worker(http: httpx.AsyncClient, engine: AsyncEngine) -> None:
    """Spans for the worker's tasks (each try, from the message's trace context), its fetches
    and its statements; nothing when tracing is off."""
    if not _enabled:
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor  # noqa: PLC0415
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor  # noqa: PLC0415
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor  # noqa: PLC0415

    CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
    HTTPXClientInstrumentor.instrument_client(http)
    # Its declared range stops below SQLAlchemy 2.1, which we run: it hooks the engine's
    # cursor events, which 2.1 keeps, and tests/e2e/test_tracing.py holds its spans.
    SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine, skip_dep_check=True)


def set_attributes(attributes: Mapping[str, int | str]) -> None:
    """Attributes of the current span (the task's try, say), when tracing is on."""
    if _enabled:
        trace.get_current_span().set_attributes(attributes)


def shutdown() -> None:
    """Export what is left (a process about to exit)."""
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "shutdown", None)
    if _enabled and flush is not None:
        flush()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def current_headers() -> dict[str, str] | None:
    """The current trace context as W3C headers, to carry across a hand-off; None when off."""
    if not _enabled:
        return None
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


def span_from_headers(name: str, headers: Mapping[str, str]) -> trace.Span:
    """A producer span, child of the context in `headers` (which it then stands for in them:
    see `inject_into`)."""
    parent = propagate.extract(headers)
    return tracer().start_span(name, context=parent, kind=trace.SpanKind.PRODUCER)


def inject_into(headers: dict[str, str], span: trace.Span) -> None:
    propagate.inject(headers, context=trace.set_span_in_context(span))


def on_loop(coroutine: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
    """`coroutine`, to run on another thread's event loop within this thread's trace context.

    asyncio gives a task the loop thread's context, not its submitter's: without this the
    fetch and the store would start traces of their own.
    """
    if not _enabled:
        return coroutine
    return _in_context(otel_context.get_current(), coroutine)


async def _in_context(context: otel_context.Context, coroutine: Coroutine[Any, Any, T]) -> T:
    # The asyncio task running this has a context of its own: attached here, it ends with it.
    otel_context.attach(context)
    return await coroutine

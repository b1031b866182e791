"""How gateway and worker write their logs: readable lines, or one JSON object a line.

`LOG_FORMAT=json` (python-json-logger) gives each record as `{"time", "level", "logger",
"message"}`, plus `task_id` and `page` while a harvest task's work is logging and `trace_id`
and `span_id` while a traced span is current, so a log collector can join a line to its task
and its trace. `text`, the default, stays the line a person reads.

The task and page travel in context variables (`task_context`), not in Celery's thread-local
request: a task's fetch, parse and store run on the worker's event loop, in an asyncio task of
their own, whose context the harvest sets too.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "{levelname}{name}{message}"
JSON_NAMES = {"levelname": "level", "name": "logger"}

current_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "log_task_id", default=None
)
current_page: contextvars.ContextVar[int | None] = contextvars.ContextVar("log_page", default=None)


def task_context(task_id: str, page: int) -> None:
    """Name the task and page of what this context logs from now on."""
    current_task_id.set(task_id)
    current_page.set(page)


class ContextFilter(logging.Filter):
    """Adds the task id, page and trace id of the record's context, where there is one."""

    def filter(self, record: logging.LogRecord) -> bool:
        task_id = current_task_id.get()
        if task_id is not None:
            record.task_id = task_id
            record.page = current_page.get()
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = trace.format_trace_id(span.trace_id)
            record.span_id = trace.format_span_id(span.span_id)
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        JSON_FIELDS,
        style="{",
        rename_fields=JSON_NAMES,
        # The record's time in ISO 8601, UTC, to the microsecond, first in each object.
        timestamp="time",
        json_ensure_ascii=False,
    )


def formatter(log_format: str) -> logging.Formatter:
    return json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def use_format(handlers: Iterable[logging.Handler], log_format: str) -> None:
    """Give handlers someone else set up (Celery's) our format and context."""
    if log_format != "json":
        return  # Celery's own text lines, with its task names and ids, stay as they are
    for handler in handlers:
        handler.setFormatter(json_formatter())
        if not any(isinstance(existing, ContextFilter) for existing in handler.filters):
            handler.addFilter(ContextFilter())


def configure(log_format: str, level: str) -> None:
    """The process's logging, for processes that set it up themselves (the gateway)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)

"""core.logs: JSON lines with the task, page and trace of their context; text stays text."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from core import logs


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.use_format([handler], "json")
    logger = logging.getLogger("tests.unit.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_is_one_json_object_with_its_fields(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured

    contextvars.copy_context().run(logger.info, "found %d on %s", 3, "a\npage")

    (line,) = lines(stream)
    assert line["message"] == "found 3 on a\npage"
    assert line["level"] == "INFO"
    assert line["logger"] == "tests.unit.test_logs"
    assert str(line["time"]).endswith("+00:00")
    assert "task_id" not in line and "trace_id" not in line


def test_a_harvest_s_lines_name_its_task_and_page_in_their_own_context(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured

    async def harvest(task_id: str, page: int) -> None:
        logs.task_context(task_id, page)
        await asyncio.sleep(0)
        logger.info("stored")

    async def both() -> None:
        # Two harvests on one loop, as in a worker process: each task keeps its own.
        await asyncio.gather(harvest("task-a", 1), harvest("task-b", 2))
        logger.info("between tasks")

    asyncio.run(both())

    found = {(line.get("task_id"), line.get("page"), line["message"]) for line in lines(stream)}
    assert found == {
        ("task-a", 1, "stored"),
        ("task-b", 2, "stored"),
        (None, None, "between tasks"),
    }


def test_a_line_logged_inside_a_span_carries_its_trace_and_span_ids(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    tracer = TracerProvider().get_tracer("test")

    with tracer.start_as_current_span("work") as span:
        logger.info("inside")
    context = span.get_span_context()

    (line,) = lines(stream)
    assert line["trace_id"] == trace.format_trace_id(context.trace_id)
    assert line["span_id"] == trace.format_span_id(context.span_id)


def test_text_format_leaves_celery_s_handlers_as_they_are() -> None:
    handler = logging.StreamHandler(io.StringIO())
    before = handler.formatter

    logs.use_format([handler], "text")

    assert handler.formatter is before
    assert handler.filters == []

"""LOG_FORMAT=json: gateway and worker write one JSON object a line, the worker's with its task."""

from __future__ import annotations

import json
from typing import Any

from projects.v1 import task_pb2
from tests.support.stack import Stack, upload, wait_for_task

# Printed by Python's warnings before Celery's logging exists (a worker run as root).
ROOT_WARNING = "running the worker with superuser privileges"


def _objects(output: str) -> list[dict[str, Any]]:
    lines = output.splitlines()
    if any(ROOT_WARNING in line for line in lines):
        # The warning's block ends with the source line it quotes; logging begins after it.
        end = next(i for i, line in enumerate(lines) if "_warn_or_raise_security_error" in line)
        lines = lines[end + 1 :]
    objects = []
    for line in lines:
        if not line.strip():
            continue
        value = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(value, dict), line
        objects.append(value)
    return objects


def test_gateway_and_worker_log_json_with_the_task_and_page(redis_stack: Stack) -> None:
    redis_stack.env["LOG_FORMAT"] = "json"
    gateway = redis_stack.start_gateway()
    worker = redis_stack.start_worker()
    task = upload(gateway, 4)
    assert wait_for_task(gateway, task.id).status == task_pb2.TASK_STATUS_SUCCESS
    worker.wait_for_line(r"page 4: found \d+")

    for process in (gateway.process, worker):
        objects = _objects(process.output())
        assert objects, process.name
        for value in objects:
            assert {"time", "level", "logger", "message"} <= value.keys(), value
    gateway_messages = [value["message"] for value in _objects(gateway.process.output())]
    assert any(message.startswith("gateway listening on") for message in gateway_messages)
    harvested = [
        value for value in _objects(worker.output()) if value["message"].startswith("page 4: found")
    ]
    assert len(harvested) == 1, harvested
    assert harvested[0]["task_id"] == task.id
    assert harvested[0]["page"] == 4
    assert harvested[0]["level"] == "INFO"

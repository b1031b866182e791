"""Celery's own monitoring sees our tasks: `celery events` and `celery inspect active`.

Task events are on (the gateway sends task-sent, the worker the rest), and the worker answers
remote control, so the tools people run against a Celery fleet show a harvest and its page.
"""

from __future__ import annotations

import json
import subprocess

from projects.v1 import task_pb2
from sample_site.pages import render_listing, sample_page
from tests.support.processes import BIN, Process, clean_environment, poll_until
from tests.support.stack import Stack, upload, wait_for_task

PAGE = 7
# Long enough for a worker on a loaded machine to take the task and answer `inspect` first.
SLOW_SECONDS = 8.0  # under the source timeout (10 s), so it answers on its first try


def _inspect_active(stack: Stack) -> list[dict[str, object]]:
    """Every task the stack's workers are running now, as `celery inspect active` says."""
    answered = subprocess.run(
        [str(BIN / "celery"), "-A", "worker.app", "inspect", "active", "--json", "--timeout", "2"],
        env=clean_environment(stack.env),
        cwd=stack.directory,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert answered.returncode == 0, answered.stdout + answered.stderr
    # One JSON object: {node name: [task, ...]}.
    replies = json.loads(answered.stdout.strip().splitlines()[-1])
    return [task for tasks in replies.values() for task in tasks]


def test_events_and_inspect_show_a_harvest_with_its_page(redis_stack: Stack) -> None:
    gateway = redis_stack.start_gateway()
    redis_stack.start_worker()
    events = Process(
        "celery-events",
        [str(BIN / "celery"), "-A", "worker.app", "events", "--dump"],
        clean_environment(redis_stack.env),
        redis_stack.directory,
    )
    redis_stack.processes.append(events)
    events.wait_for_line(r"starting capture")
    # Slow, so that it is still running when we ask the worker what it runs.
    slow = {
        "status": 200,
        "body": render_listing(sample_page(PAGE)),
        "headers": {"Content-Type": "text/html; charset=utf-8"},
        "delay": SLOW_SECONDS,
    }
    redis_stack.site.script(PAGE, [slow])
    task = upload(gateway, PAGE)

    def ours_running() -> list[dict[str, object]]:
        return [t for t in _inspect_active(redis_stack) if t.get("id") == task.id]

    (active,) = poll_until(ours_running, SLOW_SECONDS, 0.2, what="the task in inspect active")
    assert active["name"] == "projects.v1.harvest_page"
    assert active["args"] == [PAGE]
    assert wait_for_task(gateway, task.id).status == task_pb2.TASK_STATUS_SUCCESS

    named = rf"projects\.v1\.harvest_page\({task.id}\) args=\[{PAGE}\]"
    for kind in ("sent", "received", "started", "succeeded"):
        events.wait_for_line(rf"task {kind}: {named}", timeout=15)

"""Flower against a running stack: its HTTP API and, in headless Chromium, its tasks page show a
harvested task with its page.

Flower keeps what the task events tell it from the moment it starts, so it starts before the
Upload. The screenshot goes to the test's temporary directory, never into the repository.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import httpx

from projects.v1 import task_pb2
from tests.support.processes import BIN, Process, clean_environment, free_port, poll_until
from tests.support.stack import Stack, upload, wait_for_task
from tests.support.tools import require_tool

PAGE = 5


def test_flower_shows_a_harvested_task_with_its_page(redis_stack: Stack, tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    gateway = redis_stack.start_gateway()
    redis_stack.start_worker()
    port = free_port()
    flower = Process(
        "flower",
        [
            str(BIN / "celery"),
            "-A",
            "worker.app",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
        ],
        # The API answers without a login only when told to (a test on localhost).
        clean_environment({**redis_stack.env, "FLOWER_UNAUTHENTICATED_API": "true"}),
        redis_stack.directory,
    )
    redis_stack.processes.append(flower)
    url = flower.wait_for_line(r"Visit me at (http://\S+)").group(1).rstrip("/")

    def flower_task(task_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = httpx.get(f"{url}/api/tasks", timeout=5).json().get(task_id)
        return found

    # Flower subscribes to the events a moment after it says where it is, and what was
    # sent before is not replayed: a harvest whose first events came too early shows without
    # its name, and the next one is asked for (each is a real Upload, seen through to SUCCESS).
    shown: dict[str, Any] | None = None
    for _ in range(5):
        task = upload(gateway, PAGE)
        assert wait_for_task(gateway, task.id).status == task_pb2.TASK_STATUS_SUCCESS

        def succeeded(task_id: str = task.id) -> dict[str, Any] | None:
            found = flower_task(task_id)
            return found if found and found.get("state") == "SUCCESS" else None

        state = poll_until(
            succeeded,
            20,
            0.25,
            what="Flower's API to show the task succeeded",
        )
        if state.get("received") is not None:
            shown = state
            break
    assert shown is not None, "Flower never saw a whole harvest from its start"
    assert shown["name"] == "projects.v1.harvest_page"
    assert shown["args"] == f"[{PAGE}]"
    assert shown["worker"].startswith("worker-")

    # The tasks page fills its table from Flower's own API once its script runs.
    screenshot = tmp_path / "flower-tasks.png"
    browse = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
              "--virtual-time-budget=10000"]  # fmt: skip
    dom = subprocess.run(
        [*browse, "--dump-dom", f"{url}/tasks"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert task.id in dom.stdout, dom.stdout[-2000:] + dom.stderr[-2000:]
    row = dom.stdout[dom.stdout.index(task.id) :].split("</tr>")[0]
    assert "SUCCESS" in row, row
    assert "worker-" in row, row
    # The page is one of the task's arguments, on its own page in Flower.
    detail = subprocess.run(
        [*browse, "--dump-dom", f"{url}/task/{task.id}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    arguments = r"<dt>Arguments</dt>\s*<dd><pre[^>]*><code>(.*?)</code>"
    assert re.search(arguments, detail.stdout), detail.stdout[-3000:]
    assert re.search(arguments, detail.stdout).group(1) == f"[{PAGE}]"  # type: ignore[union-attr]
    subprocess.run(
        [*browse, f"--screenshot={screenshot}", f"{url}/tasks"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert screenshot.stat().st_size > 0

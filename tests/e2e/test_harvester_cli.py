"""The `harvester` command on the real service: in a real terminal (tmux) as a person uses
it, and piped, as a program uses it: JSON lines that parse, and its exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.testing import HarvesterStack
from projects.v1 import task_pb2
from sample_site.pages import render_listing
from tests.support.listings import own_projects
from tests.support.processes import free_port, poll_until
from tests.support.terminal import Terminal

HARVESTER = str(Path(sys.executable).parent / "harvester")


def environment(stack: HarvesterStack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARVESTER_")}
    env |= {"HARVESTER_ADDRESS": stack.address, "HARVESTER_TOKEN": stack.token}
    return env


def harvester(stack: HarvesterStack, *args: str) -> subprocess.CompletedProcess[str]:
    """The command run as a program runs it: stdout and stderr piped."""
    return subprocess.run(
        [HARVESTER, *args],
        env=environment(stack),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def json_lines(output: str) -> list[dict[str, object]]:
    assert "\x1b" not in output, "colour codes in piped output"
    return [json.loads(line) for line in output.splitlines()]


def slow_pages(stack: HarvesterStack, pages: range, delay: float, per_page: int = 3) -> int:
    """Script `pages` to answer after `delay` s with projects new to the database; their count."""
    for page in pages:
        body = render_listing(own_projects(per_page))
        response = {"status": 200, "headers": {"Content-Type": "text/html"}, "body": body}
        stack.site.script(page, [{**response, "delay": delay}])
    return per_page * len(pages)


def test_piped_upload_wait_prints_a_json_line_per_state_and_exits_0(
    harvester_stack: HarvesterStack,
) -> None:
    created = slow_pages(harvester_stack, range(3001, 3004), 0.2)
    done = harvester(harvester_stack, "upload", "3001-3003", "--wait")
    assert done.returncode == 0, done.stderr
    lines = json_lines(done.stdout)
    batches: list[dict[str, object]] = [line["batch"] for line in lines]  # type: ignore[misc]
    # UploadPages' answer first (PENDING, or STARTED if a worker was quicker), then each change.
    assert batches[0]["status"] in {"TASK_STATUS_PENDING", "TASK_STATUS_STARTED"}
    assert len(batches) >= 2
    last = batches[-1]
    assert last["status"] == "TASK_STATUS_SUCCESS"
    assert last["pages_succeeded"] == 3
    assert last["totals"] == {"found": created, "created": created, "updated": 0, "skipped": 0}
    assert len({b["id"] for b in batches}) == 1


def test_piped_listings_parse_as_json_lines_and_csv(harvester_stack: HarvesterStack) -> None:
    mine = own_projects(4)
    tag = mine[0].href.split("/")[2]
    harvester_stack.site.set_projects(3010, mine)
    assert harvester(harvester_stack, "upload", "3010", "--wait").returncode == 0
    listed = harvester(harvester_stack, "projects", "--query", tag, "--order", "url")
    assert listed.returncode == 0, listed.stderr
    titles = [line["project"]["title"] for line in json_lines(listed.stdout)]  # type: ignore[index]
    assert titles == sorted(p.title for p in mine)
    active = harvester(harvester_stack, "projects", "--query", tag, "--active", "--format", "csv")
    rows = active.stdout.splitlines()
    assert rows[0] == "id,title,is_active,start_date,update_time,url"
    assert len(rows) == 1 + sum(p.is_active for p in mine)
    tasks = harvester(harvester_stack, "tasks", "--limit", "3")
    assert [set(line) for line in json_lines(tasks.stdout)] == [{"task"}] * 3


def test_exit_codes_and_one_line_errors(harvester_stack: HarvesterStack) -> None:
    harvester_stack.site.script(3020, [{"status": 404, "body": "gone"}])
    failed = harvester(harvester_stack, "upload", "3020", "--wait")
    assert failed.returncode == 1, failed.stderr
    last = json_lines(failed.stdout)[-1]["task"]
    assert last["status"] == "TASK_STATUS_FAILURE" and "404" in last["error"]  # type: ignore[index]
    task_id = last["id"]  # type: ignore[index]
    assert harvester(harvester_stack, "status", task_id).returncode == 1
    failures = harvester(harvester_stack, "tasks", "--status", "failed", "--limit", "0")
    assert task_id in {line["task"]["id"] for line in json_lines(failures.stdout)}  # type: ignore[index]

    usage = harvester(harvester_stack, "upload", "three")
    assert usage.returncode == 2 and "is not a page" in usage.stderr
    out_of_range = harvester(harvester_stack, "upload", "0")
    assert out_of_range.returncode == 2
    assert out_of_range.stderr.count("\n") == 1 and "page" in out_of_range.stderr
    unknown = harvester(harvester_stack, "status", "00000000-0000-4000-8000-000000000000")
    assert unknown.returncode == 2

    refused = harvester(harvester_stack, "--token", "wrong", "tasks")
    assert refused.returncode == 3
    assert refused.stderr.count("\n") == 1 and "HARVESTER_TOKEN" in refused.stderr
    nowhere = f"127.0.0.1:{free_port()}"
    down = harvester(harvester_stack, "--address", nowhere, "--deadline", "1", "health")
    assert down.returncode == 3 and nowhere in down.stderr and down.stderr.count("\n") == 1
    healthy = harvester(harvester_stack, "health")
    assert healthy.returncode == 0
    assert json_lines(healthy.stdout) == [{"address": harvester_stack.address, "status": "SERVING"}]


class Lines:
    """A running command's stdout, line by line, read on a thread."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def documents(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in list(self.lines)]


@contextlib.contextmanager
def watching(stack: HarvesterStack, *args: str) -> Iterator[Lines]:
    popen = subprocess.Popen(
        [HARVESTER, "projects", "watch", "--format", "json", *args],
        env=environment(stack),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield Lines(popen)
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.communicate(timeout=10)


def test_projects_watch_resumes_where_its_cursor_file_says(
    harvester_stack: HarvesterStack, tmp_path: Path
) -> None:
    cursor_file = tmp_path / "feed.cursor"
    site = harvester_stack.site
    first, second = own_projects(3), own_projects(4)
    first_urls = {f"{site.url}{p.href}" for p in first}
    second_urls = {f"{site.url}{p.href}" for p in second}
    site.set_projects(3030, first)
    site.set_projects(3031, second)

    with watching(harvester_stack, "--cursor-file", str(cursor_file), "--from-beginning") as out:
        harvester_stack.client.wait(harvester_stack.client.upload(3030).id, timeout=60)

        def saved_after_first() -> bool:
            documents = out.documents()
            urls = [d["project"]["url"] for d in documents]  # type: ignore[index]
            cursors = [d["cursor"] for d in documents if d["cursor"]]
            return (
                first_urls <= set(urls)
                and bool(cursors)
                and cursor_file.exists()
                and cursor_file.read_text().strip() == cursors[-1]
            )

        poll_until(saved_after_first, 30, 0.05, "the first page's changes and their cursor")
        out.popen.send_signal(signal.SIGTERM)
        assert out.popen.wait(10) == 0  # SIGTERM ends a watch as Ctrl-C does

    harvester_stack.client.wait(harvester_stack.client.upload(3031).id, timeout=60)
    with watching(harvester_stack, "--cursor-file", str(cursor_file)) as out:
        poll_until(
            lambda: len(out.documents()) >= len(second), 30, 0.05, "the second page's changes"
        )
        resumed = [d["project"]["url"] for d in out.documents()]  # type: ignore[index]
    assert set(resumed[: len(second)]) == second_urls, "not resumed right after the first page"
    assert not first_urls & set(resumed)


@pytest.fixture
def terminal(harvester_stack: HarvesterStack) -> Iterator[Terminal]:
    env = environment(harvester_stack)
    shown = {name: env[name] for name in ("HARVESTER_ADDRESS", "HARVESTER_TOKEN")}
    screen = Terminal(shown)
    yield screen
    screen.close()


PAGES_DONE = re.compile(r"batch \w{8} .*?(\d+)/12 pages")


def test_the_progress_bar_moves_and_ends_with_the_batchs_totals(
    harvester_stack: HarvesterStack, terminal: Terminal
) -> None:
    created = slow_pages(harvester_stack, range(3101, 3113), 0.5)
    terminal.type(f"{HARVESTER} upload 3101-3112 --wait; echo EXIT=$?", "Enter")
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while not re.search(r"EXIT=\d", screen := terminal.screen()):
        seen |= {int(done) for done in PAGES_DONE.findall(screen)}
        assert time.monotonic() < deadline, screen
        time.sleep(0.05)
    assert len({n for n in seen if 0 < n < 12}) >= 2, f"the bar did not move: {sorted(seen)}"
    final = terminal.wait_for(
        r"batch (\S{36})  pages 3101-3112  SUCCESS  12/12 pages done  found (\d+)  created (\d+)"
    )
    batch = harvester_stack.client.batch(final.group(1))
    assert batch.status == task_pb2.TASK_STATUS_SUCCESS
    assert (int(final.group(2)), int(final.group(3))) == (batch.totals.found, created)
    assert batch.totals.created == created
    assert re.search(r"12/12 pages created \d+ updated 0 .*ETA", terminal.screen())
    terminal.wait_for(r"EXIT=0")


def test_ctrl_c_offers_to_cancel_the_batch(
    harvester_stack: HarvesterStack, terminal: Terminal
) -> None:
    slow_pages(harvester_stack, range(3201, 3213), 2.0)
    terminal.type(f"{HARVESTER} upload 3201-3212 --wait; echo EXIT=$?", "Enter")
    terminal.wait_for(r"batch \w{8} .* pages")
    terminal.type("C-c")
    prompt = terminal.wait_for(r"Cancel batch (\S{36})\? \[y/N\]")
    terminal.type("y", "Enter")
    terminal.wait_for(r"batch \S{36}  pages 3201-3212  REVOKED")
    terminal.wait_for(r"EXIT=1")
    batch = harvester_stack.client.batch(prompt.group(1))
    assert batch.status == task_pb2.TASK_STATUS_REVOKED
    assert batch.pages_cancelled > 0
    # A second cancel (a retry whose first answer was lost, say) is no error.
    again = harvester(harvester_stack, "cancel", batch.id)
    assert again.returncode == 0, again.stderr
    assert json_lines(again.stdout)[0]["batch"]["status"] == "TASK_STATUS_REVOKED"  # type: ignore[index]

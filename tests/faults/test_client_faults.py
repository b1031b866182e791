"""The client under faults: answers lost on the way back, and a gateway restarted under a watch.

Both on one harvester_stack (the pytest plugin's fixture), the client as a caller uses it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading

import anyio

from devstack.testing import HarvesterStack
from harvester import AsyncClient, Client, RetryPolicy
from projects.v1 import task_pb2
from sample_site.pages import render_listing
from tests.faults.proxy import AnswerEatingProxy
from tests.support.listings import own_projects
from tests.support.processes import poll_until


def test_an_upload_whose_answer_was_lost_is_retried_into_exactly_one_task(
    harvester_stack: HarvesterStack,
) -> None:
    page = 2001
    harvester_stack.site.set_projects(page, own_projects(3))
    host, port = harvester_stack.address.rsplit(":", 1)
    proxy = AnswerEatingProxy((host, int(port)))

    def stop_eating_after_the_first_loss() -> None:
        # Once an answer was dropped the gateway has made the task; the retry must find it.
        poll_until(lambda: proxy.dropped_frames > 0, 30, 0.01, "an answer to be dropped")
        proxy.eating = False
        # The connection is lost too, as after a network cut: the dropped HEADERS left its
        # HPACK state out of step, so no later answer on it could be read anyway.
        proxy.cut()

    letting_through = threading.Thread(target=stop_eating_after_the_first_loss, daemon=True)
    letting_through.start()
    try:
        with Client(
            proxy.address,
            harvester_stack.token,
            deadline=1.5,
            retry=RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.2),
        ) as client:
            task = client.upload(page)
    finally:
        letting_through.join(5)
        proxy.close()
    assert proxy.dropped_frames > 0, "the first answer was not lost: nothing was retried"
    done = harvester_stack.client.wait(task.id, timeout=60)
    assert done.status == task_pb2.TASK_STATUS_SUCCESS
    of_page = [t for t in harvester_stack.client.tasks() if t.page == page]
    assert [t.id for t in of_page] == [task.id], "the retry enqueued a second task"
    assert harvester_stack.site.hits()[page] == 1


def stored(stack: HarvesterStack, urls: set[str]) -> int:
    """How many of `urls` are in the stack's database (read directly: the gateway may be down)."""
    with contextlib.closing(sqlite3.connect(stack.directory / "data" / "projects.db")) as db:
        marks = ",".join("?" * len(urls))
        row = db.execute(f"SELECT count(*) FROM projects WHERE url IN ({marks})", sorted(urls))
        return int(row.fetchone()[0])


async def test_a_watch_across_a_gateway_restart_misses_nothing_and_repeats_nothing(
    harvester_stack: HarvesterStack,
) -> None:
    site = harvester_stack.site
    before, during, after = own_projects(4), own_projects(5), own_projects(6)
    site.set_projects(2101, before)
    # Its fetch is held long enough for the gateway to be down when its rows are stored.
    site.script(
        2102,
        [
            {
                "status": 200,
                "headers": {"Content-Type": "text/html; charset=utf-8"},
                "body": render_listing(during),
                "delay": 2.5,
            }
        ],
    )
    site.set_projects(2103, after)
    urls = {name: {f"{site.url}{p.href}" for p in group} for name, group in
            (("before", before), ("during", during), ("after", after))}  # fmt: skip
    client = harvester_stack.client
    client.wait(client.upload(2101).id, timeout=60)

    seen: list[str] = []
    caught_up = anyio.Event()
    everything = anyio.Event()
    wanted = urls["before"] | urls["during"] | urls["after"]

    async def watch() -> None:
        async with AsyncClient(harvester_stack.address, harvester_stack.token) as watcher:
            async for change in watcher.watch_projects(from_beginning=True):
                if change.project.url in wanted:
                    seen.append(change.project.url)
                if urls["before"] <= set(seen):
                    caught_up.set()
                if wanted <= set(seen):
                    everything.set()
                    return

    with anyio.fail_after(90):
        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            await caught_up.wait()
            during_task = client.upload(2102)
            await anyio.to_thread.run_sync(harvester_stack.stop_gateway)
            assert stored(harvester_stack, urls["during"]) == 0, "stored before the gateway stopped"
            await anyio.to_thread.run_sync(
                lambda: poll_until(
                    lambda: stored(harvester_stack, urls["during"]) == 5, 30, 0.05, "page 2102"
                )
            )
            await anyio.to_thread.run_sync(harvester_stack.start_gateway)
            await anyio.to_thread.run_sync(lambda: client.wait(during_task.id, timeout=60))
            await anyio.to_thread.run_sync(lambda: client.wait(client.upload(2103).id, timeout=60))
            await everything.wait()
    assert sorted(seen) == sorted(wanted), "a change was missed or came twice"

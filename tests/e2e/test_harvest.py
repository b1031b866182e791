"""Harvests end to end: gateway, worker(s) and a local site as processes, driven through gRPC."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import pytest

from projects.v1 import task_pb2
from sample_site.pages import SampleProject, render_listing
from tests.conftest import StackFactory
from tests.support.processes import RedisServer, poll_until
from tests.support.stack import Stack, get_status, upload, wait_for_task


def listing(*projects: tuple[str, str]) -> str:
    return render_listing(
        [
            SampleProject(title, href, f"About {title}", True, dt.date(2024, 5, 1))
            for title, href in projects
        ]
    )


def test_reharvest_refreshes_without_duplicates(redis_stack: Stack) -> None:
    gateway = redis_stack.start_gateway()
    redis_stack.start_worker()
    redis_stack.site.set_page(1, listing(("Alpha", "/p/a"), ("Beta", "/p/b"), ("Gamma", "/p/c")))
    first = wait_for_task(gateway, upload(gateway, 1).id)
    assert first.status == task_pb2.TASK_STATUS_SUCCESS, first.error
    assert (first.result.found, first.result.created, first.result.updated) == (3, 3, 0)

    # Beta renamed, Delta new, Gamma listed twice: one row per link, a listing counts twice.
    redis_stack.site.set_page(
        1,
        listing(
            ("Alpha", "/p/a"),
            ("Beta v2", "/p/b"),
            ("Gamma", "/p/c"),
            ("Gamma", "/p/c"),
            ("Delta", "/p/d"),
        ),
    )
    second = wait_for_task(gateway, upload(gateway, 1).id)
    assert second.status == task_pb2.TASK_STATUS_SUCCESS, second.error
    assert (second.result.found, second.result.created, second.result.updated) == (5, 1, 1)
    third = wait_for_task(gateway, upload(gateway, 1).id)
    assert (third.result.created, third.result.updated) == (0, 0)

    projects = redis_stack.projects()
    site = redis_stack.site.url
    assert sorted(projects) == [f"{site}/p/{c}" for c in "abcd"]
    assert projects[f"{site}/p/b"].title == "Beta v2"
    assert redis_stack.row_counts() == (4, 4)


def test_retries_on_503_then_succeeds(redis_stack: Stack) -> None:
    gateway = redis_stack.start_gateway()
    redis_stack.start_worker()
    redis_stack.site.script(2, [{"status": 503}, {"status": 503}])
    done = wait_for_task(gateway, upload(gateway, 2).id)
    assert done.status == task_pb2.TASK_STATUS_SUCCESS, done.error
    assert done.result.created == 10
    assert redis_stack.site.hits()[2] == 3


def test_429_reports_retry_and_honours_retry_after(redis_stack: Stack) -> None:
    gateway = redis_stack.start_gateway()
    redis_stack.start_worker()
    redis_stack.site.script(3, [{"status": 429, "headers": {"Retry-After": "2"}}])
    task_id = upload(gateway, 3).id
    waiting = poll_until(
        lambda: (t := get_status(gateway, task_id)).status == task_pb2.TASK_STATUS_RETRY and t,
        30,
        0.05,
        "the RETRY state",
    )
    assert "429" in waiting.error
    done = wait_for_task(gateway, task_id)
    assert done.status == task_pb2.TASK_STATUS_SUCCESS, done.error
    waited = done.finish_time.ToDatetime() - done.start_time.ToDatetime()
    assert waited >= dt.timedelta(seconds=2), f"Retry-After: 2 was not honoured (waited {waited})"
    assert redis_stack.site.hits()[3] == 2


def test_gives_up_after_the_configured_tries(
    make_stack: StackFactory, own_redis: RedisServer
) -> None:
    stack = make_stack(broker_url=own_redis.url, RETRY_MAX_TRIES="3")
    gateway = stack.start_gateway()
    stack.start_worker()
    stack.site.script(4, [{"status": 503}] * 10)
    done = wait_for_task(gateway, upload(gateway, 4).id)
    assert done.status == task_pb2.TASK_STATUS_FAILURE
    assert "after 3 tries" in done.error and "503" in done.error
    assert stack.site.hits()[4] == 3


def test_reports_started_while_the_page_is_fetched(redis_stack: Stack) -> None:
    gateway = redis_stack.start_gateway()
    redis_stack.start_worker()
    slow = {
        "status": 200,
        "headers": {"Content-Type": "text/html; charset=utf-8"},
        "body": listing(("Slow", "/p/slow")),
        "delay": 3,
    }
    redis_stack.site.script(5, [slow])
    task_id = upload(gateway, 5).id
    running = poll_until(
        lambda: (t := get_status(gateway, task_id)).status == task_pb2.TASK_STATUS_STARTED and t,
        30,
        0.05,
        "the STARTED state",
    )
    assert running.HasField("start_time") and not running.HasField("finish_time")
    done = wait_for_task(gateway, task_id)
    assert done.status == task_pb2.TASK_STATUS_SUCCESS, done.error
    assert done.result.created == 1


def test_404_fails_at_once_naming_it(redis_stack: Stack) -> None:
    gateway = redis_stack.start_gateway()
    redis_stack.start_worker()
    done = wait_for_task(gateway, upload(gateway, 21).id)  # the sample site has 20 pages
    assert done.status == task_pb2.TASK_STATUS_FAILURE
    assert "404" in done.error and "page=21" in done.error
    assert done.HasField("finish_time")
    assert redis_stack.site.hits()[21] == 1


def run_two_workers_on_the_same_pages(stack: Stack) -> None:
    gateway = stack.start_gateway()
    stack.start_worker("worker-a", concurrency=4)
    stack.start_worker("worker-b", concurrency=4)
    pages = [1, 2, 3, 4, 5, 6] * 3
    with ThreadPoolExecutor(8) as pool:
        task_ids = list(pool.map(lambda page: upload(gateway, page).id, pages))
        finished = list(pool.map(lambda task_id: wait_for_task(gateway, task_id, 90), task_ids))
    assert [t.status for t in finished] == [task_pb2.TASK_STATUS_SUCCESS] * len(pages), [
        t.error for t in finished if t.error
    ]
    assert sum(t.result.created for t in finished) == 60
    assert all(t.result.found == 10 for t in finished)
    assert stack.row_counts() == (60, 60)
    # Both workers took part, or the test proved nothing about concurrency.
    for worker in ("worker-a", "worker-b"):
        process = next(p for p in stack.processes if p.name == worker)
        assert "succeeded" in process.output(), f"{worker} ran no task"


def test_two_workers_store_the_same_pages_at_once_on_sqlite(redis_stack: Stack) -> None:
    run_two_workers_on_the_same_pages(redis_stack)


@pytest.mark.postgres
def test_two_workers_store_the_same_pages_at_once_on_postgres(
    make_stack: StackFactory, own_redis: RedisServer, postgres_url: str
) -> None:
    run_two_workers_on_the_same_pages(
        make_stack(broker_url=own_redis.url, database_url=postgres_url)
    )

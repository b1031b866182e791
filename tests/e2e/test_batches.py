"""Batches, watching, cancelling and listing tasks through the generated stubs, against real
processes: gateway, Celery workers, a Redis of the test's own, SQLite (and PostgreSQL where
marked).

Most tests share one stack (`shared`: one gateway, two workers) and keep to pages of their own
(above the sample site's 20, served through its control API with projects of their own), so
that one test's harvest is never another's "known" page. A test that needs a queue no worker
reads yet, or that stops the gateway, starts a stack of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.rpc import error_details_pb2

from projects.v1 import queue_service_pb2, task_pb2
from sample_site.pages import render_listing, sample_project
from tests.conftest import own_redis_server, stacks_in
from tests.support.processes import Gateway, Site, poll_until, start_site
from tests.support.services import postgres_database
from tests.support.stack import (
    OTHER_TOKEN,
    TERMINAL,
    TEST_TOKEN,
    Stack,
    get_status,
    rpc_detail,
    upload,
    wait_for_task,
)

POSTGRES = pytest.param("postgresql", marks=pytest.mark.postgres)
PER_PAGE = 10  # projects per page, on the sample site and on the pages served here
WINDOW = 4  # UNTIL_KNOWN_WINDOW's default
LISTER_TOKEN = "lister-token-" + uuid.uuid4().hex
HTML = {"Content-Type": "text/html; charset=utf-8"}

Status = task_pb2.TaskStatus
PENDING = task_pb2.TASK_STATUS_PENDING
STARTED = task_pb2.TASK_STATUS_STARTED
RETRY = task_pb2.TASK_STATUS_RETRY
SUCCESS = task_pb2.TASK_STATUS_SUCCESS
FAILURE = task_pb2.TASK_STATUS_FAILURE
REVOKED = task_pb2.TASK_STATUS_REVOKED


# --- calls ----------------------------------------------------------------------------------


def auth(token: str = TEST_TOKEN) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def upload_pages(
    gateway: Gateway,
    first: int,
    last: int,
    *,
    request_id: str = "",
    until_known: bool = False,
    token: str = TEST_TOKEN,
) -> task_pb2.Batch:
    request = queue_service_pb2.UploadPagesRequest(
        first_page=first, last_page=last, request_id=request_id, until_known=until_known
    )
    return gateway.stub.UploadPages(request, metadata=auth(token), timeout=15).batch


def get_batch(gateway: Gateway, batch_id: str, token: str = TEST_TOKEN) -> task_pb2.Batch:
    request = queue_service_pb2.GetBatchRequest(id=batch_id)
    return gateway.stub.GetBatch(request, metadata=auth(token), timeout=10).batch


def cancel_task(gateway: Gateway, task_id: str, token: str = TEST_TOKEN) -> task_pb2.Task:
    request = queue_service_pb2.CancelTaskRequest(id=task_id)
    return gateway.stub.CancelTask(request, metadata=auth(token), timeout=10).task


def cancel_batch(gateway: Gateway, batch_id: str, token: str = TEST_TOKEN) -> task_pb2.Batch:
    request = queue_service_pb2.CancelBatchRequest(id=batch_id)
    return gateway.stub.CancelBatch(request, metadata=auth(token), timeout=10).batch


def list_tasks(
    gateway: Gateway, token: str = TEST_TOKEN, **request: Any
) -> queue_service_pb2.ListTasksResponse:
    return gateway.stub.ListTasks(
        queue_service_pb2.ListTasksRequest(**request), metadata=auth(token), timeout=10
    )


def all_tasks(gateway: Gateway, token: str = TEST_TOKEN, **request: Any) -> list[task_pb2.Task]:
    """Every task ListTasks gives for `request`, page after page."""
    tasks: list[task_pb2.Task] = []
    token_ = ""
    while True:
        page = list_tasks(gateway, token, page_token=token_, **request)
        tasks.extend(page.tasks)
        if not page.next_page_token:
            return tasks
        token_ = page.next_page_token


def watch_status(
    gateway: Gateway, task_id: str, token: str = TEST_TOKEN, timeout: float = 60
) -> Any:
    request = queue_service_pb2.WatchStatusRequest(id=task_id)
    return gateway.stub.WatchStatus(request, metadata=auth(token), timeout=timeout)


def watch_batch(
    gateway: Gateway, batch_id: str, token: str = TEST_TOKEN, timeout: float = 60
) -> Any:
    request = queue_service_pb2.WatchBatchRequest(id=batch_id)
    return gateway.stub.WatchBatch(request, metadata=auth(token), timeout=timeout)


def rpc_error(call: Callable[..., object], *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The error `call(*args, **kwargs)` raises."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def violation(error: grpc.RpcError) -> tuple[str, str]:
    """The (field, description) of an INVALID_ARGUMENT's one BadRequest field violation."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    found = rpc_detail(error, error_details_pb2.BadRequest).field_violations
    assert len(found) == 1, found
    return found[0].field, found[0].description


def wait_for(gateway: Gateway, task_id: str, token: str, timeout: float = 60) -> task_pb2.Task:
    def finished() -> task_pb2.Task | None:
        task = get_status(gateway, task_id, token)
        return task if task.status in TERMINAL else None

    done: task_pb2.Task = poll_until(finished, timeout, 0.05, f"task {task_id} to finish")
    return done


def wait_for_batch(gateway: Gateway, batch_id: str, timeout: float = 60) -> task_pb2.Batch:
    def finished() -> task_pb2.Batch | None:
        batch = get_batch(gateway, batch_id)
        return batch if batch.HasField("finish_time") else None

    done: task_pb2.Batch = poll_until(finished, timeout, 0.05, f"batch {batch_id} to finish")
    return done


# --- the site's pages -----------------------------------------------------------------------


def backend_states(stack: Stack, task_ids: list[str]) -> dict[str, str]:
    """The states Celery's result backend holds of these tasks, by id (none for most)."""
    prefix = stack.env["REDIS_KEY_PREFIX"]
    url = stack.env.get("CELERY_RESULT_BACKEND") or stack.env["CELERY_BROKER_URL"]
    client = redis.Redis.from_url(url)
    try:
        found = client.mget([f"{prefix}celery-task-meta-{task_id}" for task_id in task_ids])
    finally:
        client.close()
    return {
        task_id: json.loads(meta)["status"]
        for task_id, meta in zip(task_ids, found, strict=True)
        if meta is not None
    }


def page_numbers(page: int) -> range:
    """The numbers of page `page`'s projects (the sample site's own for pages 1..20)."""
    return range((page - 1) * PER_PAGE + 1, page * PER_PAGE + 1)


def page_body(page: int) -> str:
    return render_listing([sample_project(n) for n in page_numbers(page)])


def serve(site: Site, pages: range) -> None:
    """Serve pages past the sample site's own, each with ten projects of its own."""
    for page in pages:
        site.set_page(page, page_body(page), HTML["Content-Type"])


def slow(site: Site, pages: range, delay: float) -> None:
    """The next fetch of each page answers after `delay`, with its real body."""
    for page in pages:
        site.script(
            page, [{"status": 200, "headers": HTML, "body": page_body(page), "delay": delay}]
        )


def stored_pages(stack: Stack, pages: range) -> dict[int, int]:
    """How many of each page's projects are stored, by page."""
    numbers = {
        int(match.group(1))
        for url in stack.projects()
        if (match := re.search(r"/projects/(\d+)$", url)) is not None
    }
    return {page: len(numbers & set(page_numbers(page))) for page in pages}


# --- stacks ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_database() -> Iterator[None]:
    yield None


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """One stack for the module: a gateway and two workers of two threads, SQLite; a third
    client, 'lister', whose tasks only ListTasks' test makes."""
    directory = tmp_path_factory.mktemp("batches")
    site = start_site(directory)
    try:
        with (
            own_redis_server(directory / "redis") as redis_server,
            stacks_in(directory, site, lambda: request.session.testsfailed > 0) as make,
        ):
            stack = make(
                broker_url=redis_server.url,
                API_TOKENS=f"tester:{TEST_TOKEN},other:{OTHER_TOKEN},lister:{LISTER_TOKEN}",
            )
            stack.start_gateway()
            stack.start_worker("w1", concurrency=2)
            stack.start_worker("w2", concurrency=2)
            yield stack
    finally:
        site.process.stop()


@pytest.fixture
def fresh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A stack of the test's own, SQLite, nothing started yet."""
    site = start_site(tmp_path)
    try:
        with (
            own_redis_server(tmp_path / "redis") as redis_server,
            stacks_in(tmp_path, site, lambda: request.session.testsfailed > 0) as make,
        ):
            yield make(broker_url=redis_server.url)
    finally:
        site.process.stop()


@pytest.fixture(params=["sqlite", POSTGRES])
def any_database(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """`fresh`, on SQLite and on a fresh PostgreSQL database."""
    site = start_site(tmp_path)
    try:
        with (
            own_redis_server(tmp_path / "redis") as redis_server,
            stacks_in(tmp_path, site, lambda: request.session.testsfailed > 0) as make,
            postgres_database() if request.param == "postgresql" else _no_database() as url,
        ):
            yield make(broker_url=redis_server.url, database_url=url)
    finally:
        site.process.stop()


# --- a batch, start to end ------------------------------------------------------------------


def test_a_batch_of_twelve_pages_by_two_workers(any_database: Stack) -> None:
    stack = any_database
    pages = range(1, 13)
    slow(stack.site, pages, 0.2)  # so that the watcher sees the batch in progress
    gateway = stack.start_gateway()
    batch = upload_pages(gateway, 1, 12)
    assert batch.status == PENDING
    assert (batch.first_page, batch.last_page, batch.until_known) == (1, 12, False)
    assert (batch.pages_total, batch.pages_succeeded, batch.stop_page) == (12, 0, 0)
    assert batch.HasField("enqueue_time") and not batch.HasField("start_time")
    watched = iter(watch_batch(gateway, batch.id, timeout=90))
    seen = [next(watched).batch]
    assert seen[0] == get_batch(gateway, batch.id)  # no worker yet: as it is now, PENDING
    assert seen[0].status == PENDING
    stack.start_worker("w1", concurrency=2)
    stack.start_worker("w2", concurrency=2)
    seen += [message.batch for message in watched]  # ends by itself after the final state

    statuses = [message.status for message in seen]
    assert statuses[0] == PENDING and statuses[-1] == SUCCESS
    assert set(statuses[1:-1]) <= {STARTED}, statuses
    assert all(a != b for a, b in itertools.pairwise(seen)), "a message sent twice"
    succeeded = [message.pages_succeeded for message in seen]
    assert succeeded == sorted(succeeded), succeeded
    assert any(0 < n < 12 for n in succeeded), f"no progress between the ends: {succeeded}"
    assert [m.HasField("finish_time") for m in seen] == [False] * (len(seen) - 1) + [True]

    last = seen[-1]
    assert (last.pages_total, last.pages_succeeded, last.pages_failed) == (12, 12, 0)
    assert last.pages_cancelled == 0 and last.error == ""
    assert (last.totals.found, last.totals.created, last.totals.updated) == (120, 120, 0)
    assert get_batch(gateway, batch.id) == last

    tasks = all_tasks(gateway, batch_id=batch.id)
    assert sorted(task.page for task in tasks) == list(pages)
    assert {task.batch_id for task in tasks} == {batch.id}
    assert all(task.enqueue_time == batch.enqueue_time for task in tasks)
    results = [get_status(gateway, task.id) for task in tasks]
    assert {task.status for task in results} == {SUCCESS}
    for name in ("found", "created", "updated", "skipped"):
        assert sum(getattr(task.result, name) for task in results) == getattr(last.totals, name)
    assert all(task.result.created == PER_PAGE for task in results)
    # The batch started with its first page and finished with its last.
    assert last.start_time.ToDatetime() <= min(t.finish_time.ToDatetime() for t in results)
    assert last.finish_time == max((t.finish_time for t in results), key=lambda t: t.ToDatetime())
    assert stack.row_counts() == (120, 120)


def test_a_batch_page_failing_with_an_error_nothing_expects_ends_and_its_batch_too(
    fresh: Stack,
) -> None:
    """An error the task's code does not expect (a bug; here a failpoint's) ends the page
    FAILURE in its record, so its batch counts it and ends; and Celery stores it too, although
    a batch's pages keep nothing else in the result backend."""
    stack = fresh
    gateway = stack.start_gateway()
    stack.start_worker("w1", concurrency=2, FAILPOINTS="before_fetch=raise@2")
    batch = upload_pages(gateway, 1, 3)
    pages = {task.page: task.id for task in all_tasks(gateway, batch_id=batch.id)}

    done = wait_for_batch(gateway, batch.id)
    assert done.status == FAILURE
    assert (done.pages_succeeded, done.pages_failed) == (2, 1)
    assert done.error.startswith("page 2: page 2 failed unexpectedly (FailpointError: "), done
    failed = get_status(gateway, pages[2])
    assert failed.status == FAILURE
    assert "failpoint before_fetch on page 2" in failed.error
    assert {get_status(gateway, pages[page]).status for page in (1, 3)} == {SUCCESS}
    assert backend_states(stack, list(pages.values())) == {pages[2]: "FAILURE"}


# --- request_id, validation, not found ------------------------------------------------------


def test_request_id_returns_the_same_batch_and_refuses_other_pages(shared: Stack) -> None:
    gateway = shared.gateways[0]
    serve(shared.site, range(101, 104))
    request_id = f"batch-{uuid.uuid4()}"
    first = upload_pages(gateway, 101, 103, request_id=request_id)
    again = upload_pages(gateway, 101, 103, request_id=request_id)
    assert again.id == first.id
    for other in ((101, 104, False), (102, 103, False), (101, 103, True)):
        first_page, last_page, until_known = other
        error = rpc_error(
            upload_pages,
            gateway,
            first_page,
            last_page,
            request_id=request_id,
            until_known=until_known,
        )
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS, other
        assert first.id in (error.details() or "")
    # Another client's request_id is its own.
    theirs = upload_pages(gateway, 101, 103, request_id=request_id, token=OTHER_TOKEN)
    assert theirs.id != first.id
    done = wait_for_batch(gateway, first.id)
    assert (done.status, done.pages_total, done.pages_succeeded) == (SUCCESS, 3, 3)
    # The repeat enqueued nothing: three tasks in the batch, as the first call made them.
    assert sorted(task.page for task in all_tasks(gateway, batch_id=first.id)) == [101, 102, 103]
    assert upload_pages(gateway, 101, 103, request_id=request_id) == done
    assert all_tasks(gateway, OTHER_TOKEN, batch_id=first.id) == []
    error = rpc_error(lambda: get_batch(gateway, first.id, OTHER_TOKEN))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_invalid_batches_name_the_field(shared: Stack) -> None:
    gateway = shared.gateways[0]
    small = shared.start_gateway("gateway-max-5", MAX_BATCH_PAGES="5")
    cases = [
        (gateway, 0, 3, "first_page", "is required: a listing page from 1 to 10000"),
        (gateway, -1, 3, "first_page", "must be from 1 to 10000; got -1"),
        (gateway, 10_001, 10_001, "first_page", "must be from 1 to 10000; got 10001"),
        (gateway, 3, 0, "last_page", "is required"),
        (gateway, 5, 4, "last_page", "must not be below first_page (5); got 4"),
        (gateway, 9_999, 10_001, "last_page", "must be from 1 to 10000; got 10001"),
        (small, 1, 6, "last_page", "at most 5 pages (MAX_BATCH_PAGES): from 1, at most 5; got 6"),
        (small, 10, 20, "last_page", "from 10, at most 14; got 20"),
    ]
    for target, first, last, field, words in cases:
        error = rpc_error(upload_pages, target, first, last)
        named, description = violation(error)
        assert named == field, (first, last, error.details())
        assert words in description, (first, last, description)
    named, _ = violation(rpc_error(lambda: upload_pages(gateway, 1, 2, request_id="has space")))
    assert named == "request_id"
    # As many pages as MAX_BATCH_PAGES allows is a batch.
    serve(shared.site, range(301, 306))
    allowed = upload_pages(small, 301, 305)
    assert allowed.pages_total == 5
    assert wait_for_batch(small, allowed.id).status == SUCCESS
    # Unknown, another client's, and garbled batch ids.
    error = rpc_error(lambda: get_batch(gateway, str(uuid.uuid4())))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(lambda: get_batch(gateway, allowed.id, OTHER_TOKEN))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert violation(rpc_error(lambda: get_batch(gateway, "not-an-id")))[0] == "id"
    error = rpc_error(lambda: cancel_batch(gateway, str(uuid.uuid4())))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(
        lambda: gateway.stub.UploadPages(
            queue_service_pb2.UploadPagesRequest(first_page=1, last_page=2), timeout=10
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


# --- until_known ----------------------------------------------------------------------------


def test_until_known_stops_after_the_first_page_that_created_nothing(shared: Stack) -> None:
    gateway = shared.gateways[0]
    site = shared.site
    # Pages 401..415: 401-405 new, 406-410 harvested first. The stop lies past the first window,
    # so the pages from 405 on can only have been enqueued by the workers.
    base = 400
    serve(site, range(base + 1, base + 16))
    lone = [upload(gateway, page).id for page in range(base + 6, base + 11)]
    for task_id in lone:
        assert wait_for_task(gateway, task_id).result.created == PER_PAGE
    before = site.hits()

    batch = upload_pages(gateway, base + 1, base + 15, until_known=True)
    assert batch.until_known and batch.pages_total == WINDOW  # the first window only
    done = wait_for_batch(gateway, batch.id)
    assert done.status == SUCCESS
    assert done.stop_page == base + 6
    assert done.totals.created == 5 * PER_PAGE
    tasks = all_tasks(gateway, batch_id=batch.id)
    fetched = sorted(task.page for task in tasks)
    assert len(tasks) == done.pages_total == done.pages_succeeded
    assert fetched == list(range(base + 1, fetched[-1] + 1))  # from the first, none skipped
    # A page is enqueued only while fewer than WINDOW pages past the lowest unfinished one,
    # and nothing after the stop: never past stop_page + WINDOW - 1.
    assert fetched[-1] <= done.stop_page + WINDOW - 1
    hits = site.hits()
    during = {page: hits.get(page, 0) - before.get(page, 0) for page in range(base + 1, base + 16)}
    assert {page: n for page, n in during.items() if n} == dict.fromkeys(fetched, 1)
    assert all(during[page] == 0 for page in range(done.stop_page + WINDOW, base + 16))
    # A batch's pages, the first window and those the workers enqueued, keep their states in
    # their records alone; a lone Upload's are in Celery's result backend too.
    assert len(tasks) > WINDOW
    assert backend_states(shared, [task.id for task in tasks]) == {}
    assert set(backend_states(shared, lone).values()) == {"SUCCESS"}


# --- cancelling -----------------------------------------------------------------------------


def test_cancel_a_queued_task_and_no_worker_ever_fetches_it(fresh: Stack) -> None:
    gateway = fresh.start_gateway()
    task = upload(gateway, 9)
    assert task.status == PENDING
    cancelled = cancel_task(gateway, task.id)
    assert (cancelled.status, cancelled.error) == (REVOKED, "cancelled")
    assert cancelled.HasField("finish_time") and not cancelled.HasField("start_time")
    assert cancel_task(gateway, task.id) == cancelled  # twice is fine: as it ended
    assert get_status(gateway, task.id) == cancelled
    # Another client's task, an unknown one, a garbled id.
    error = rpc_error(lambda: cancel_task(gateway, task.id, OTHER_TOKEN))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(lambda: cancel_task(gateway, str(uuid.uuid4())))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert violation(rpc_error(lambda: cancel_task(gateway, "42")))[0] == "id"

    worker = fresh.start_worker()
    # The worker takes the cancelled task's message and drops it without running it.
    worker.wait_for_line(rf"(?=.*{task.id})(?=.*(ended already|[Rr]evoked))")
    witness = wait_for_task(gateway, upload(gateway, 10).id)
    assert witness.status == SUCCESS
    hits = fresh.site.hits()
    assert hits.get(9, 0) == 0 and hits[10] == 1
    after = get_status(gateway, task.id)
    assert after == cancelled  # as it ended: no result, and no start
    # A finished task cannot be cancelled; the answer names how it finished.
    error = rpc_error(lambda: cancel_task(gateway, witness.id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SUCCESS" in (error.details() or "")
    assert get_status(gateway, witness.id).status == SUCCESS


def test_cancel_a_running_task_before_it_stores(shared: Stack) -> None:
    gateway = shared.gateways[0]
    page = 501
    slow(shared.site, range(page, page + 1), 2.0)
    task = upload(gateway, page)
    watched = iter(watch_status(gateway, task.id))
    seen = [next(watched).task]
    while seen[-1].status != STARTED:
        seen.append(next(watched).task)
    asked = cancel_task(gateway, task.id)
    assert asked.status == STARTED  # fetching; it ends REVOKED at its checkpoint
    seen += [message.task for message in watched]
    assert seen[-1].status == REVOKED, seen
    assert seen[-1].error == "cancelled" and not seen[-1].HasField("result")
    assert seen[-1].HasField("start_time") and seen[-1].HasField("finish_time")
    assert get_status(gateway, task.id) == seen[-1]
    assert shared.site.hits()[page] == 1  # it was fetched,
    assert stored_pages(shared, range(page, page + 1)) == {page: 0}  # but nothing stored
    assert cancel_task(gateway, task.id) == seen[-1]  # ended REVOKED: a repeat is fine


def test_cancel_a_batch_mid_way(shared: Stack) -> None:
    gateway = shared.gateways[0]
    pages = range(601, 631)
    slow(shared.site, pages, 0.5)
    batch = upload_pages(gateway, pages[0], pages[-1])
    assert batch.pages_total == 30
    watched = iter(watch_batch(gateway, batch.id))
    for message in watched:
        if message.batch.pages_succeeded >= 4:
            break
    cancelled = cancel_batch(gateway, batch.id)
    assert cancelled.status == REVOKED
    assert 4 <= cancelled.pages_succeeded < 30
    assert cancelled.pages_cancelled > 0  # the pages no worker had started, at once
    rest = [message.batch for message in watched]  # ends once every page has ended
    done = rest[-1] if rest else get_batch(gateway, batch.id)
    assert done.HasField("finish_time") and done.status == REVOKED
    assert all(m.status == REVOKED for m in rest)
    assert done == get_batch(gateway, batch.id)

    tasks = {task.page: task for task in all_tasks(gateway, batch_id=batch.id)}
    assert sorted(tasks) == list(pages)
    statuses = [task.status for task in tasks.values()]
    assert set(statuses) <= {SUCCESS, REVOKED}, statuses
    assert done.pages_succeeded == statuses.count(SUCCESS)
    assert done.pages_cancelled == statuses.count(REVOKED)
    assert done.pages_succeeded + done.pages_cancelled == done.pages_total == 30
    assert done.pages_failed == 0 and done.error == ""
    assert done.totals.created == PER_PAGE * done.pages_succeeded
    # Finished once its last page had ended.
    last_end = max(task.finish_time.ToDatetime() for task in tasks.values())
    assert done.finish_time.ToDatetime() >= last_end
    # What was cancelled stored nothing; what was never started was never fetched.
    stored = stored_pages(shared, pages)
    hits = shared.site.hits()
    for page, task in tasks.items():
        assert stored[page] == (PER_PAGE if task.status == SUCCESS else 0), page
        if not task.HasField("start_time"):
            assert hits.get(page, 0) == 0, page
    # Cancelling it again answers as it is; a batch that finished otherwise cannot be.
    assert cancel_batch(gateway, batch.id) == done
    serve(shared.site, range(631, 633))
    finished = wait_for_batch(gateway, upload_pages(gateway, 631, 632).id)
    assert finished.status == SUCCESS
    error = rpc_error(lambda: cancel_batch(gateway, finished.id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SUCCESS" in (error.details() or "")
    error = rpc_error(lambda: cancel_batch(gateway, batch.id, OTHER_TOKEN))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# --- watching -------------------------------------------------------------------------------


def test_watch_status_through_retries_to_success(fresh: Stack) -> None:
    page = 3
    busy = {"status": 503, "headers": {"Retry-After": "1"}, "body": "busy"}
    # The first answer takes a moment, so the watcher reads the first try as STARTED.
    fresh.site.script(page, [{**busy, "delay": 0.5}, busy])
    gateway = fresh.start_gateway()
    task = upload(gateway, page)
    watched = iter(watch_status(gateway, task.id))
    seen = [next(watched).task]
    assert seen[0].status == PENDING  # no worker yet
    fresh.start_worker()
    seen += [message.task for message in watched]  # ends after the final state

    statuses = [task_pb2.TaskStatus.Name(message.status) for message in seen]
    assert statuses[0] == "TASK_STATUS_PENDING" and statuses[-1] == "TASK_STATUS_SUCCESS"
    assert "TASK_STATUS_STARTED" in statuses and "TASK_STATUS_RETRY" in statuses, statuses
    assert statuses.index("TASK_STATUS_STARTED") < statuses.index("TASK_STATUS_RETRY")
    assert set(statuses[1:-1]) <= {"TASK_STATUS_STARTED", "TASK_STATUS_RETRY"}, statuses
    assert all(a != b for a, b in itertools.pairwise(statuses)), statuses
    for message in seen:
        if message.status == RETRY:
            assert "503" in message.error, message
    assert seen[-1].result.created == PER_PAGE
    assert seen[-1] == get_status(gateway, task.id)
    assert fresh.site.hits()[page] == 3

    error = rpc_error(lambda: next(iter(watch_status(gateway, str(uuid.uuid4())))))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(lambda: next(iter(watch_status(gateway, task.id, OTHER_TOKEN))))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # A finished task's stream is its final state, and the end.
    assert [message.task for message in watch_status(gateway, task.id)] == [seen[-1]]


def test_sigterm_ends_open_watch_streams_unavailable(fresh: Stack) -> None:
    gateway = fresh.start_gateway(GATEWAY_GRACE_SECONDS="3")
    task = upload(gateway, 1)
    batch = upload_pages(gateway, 2, 3)
    status_stream = iter(watch_status(gateway, task.id))
    batch_stream = iter(watch_batch(gateway, batch.id))
    assert next(status_stream).task.status == PENDING  # open at the gateway, and idle
    assert next(batch_stream).batch.status == PENDING
    started = time.monotonic()
    gateway.process.send(signal.SIGTERM)
    for stream in (status_stream, batch_stream):
        error = rpc_error(next, stream)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (error.details() or "")
    assert time.monotonic() - started < 3.0  # within GATEWAY_GRACE_SECONDS
    assert gateway.process.popen.wait(30) == 0


# --- listing --------------------------------------------------------------------------------


def test_list_tasks_newest_first_in_pages_and_filtered(shared: Stack) -> None:
    gateway = shared.gateways[0]
    # Ten tasks of the lister's own: seven pages that exist, three that do not (FAILURE).
    pages = [1, 9001, 2, 3, 9002, 4, 5, 9003, 6, 7]
    ids = [upload(gateway, page, token=LISTER_TOKEN).id for page in pages]
    for task_id in ids:
        wait_for(gateway, task_id, LISTER_TOKEN)
    newest_first = ids[::-1]

    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page = list_tasks(gateway, LISTER_TOKEN, page_size=3, page_token=token)
        seen += [task.id for task in page.tasks]
        sizes.append(len(page.tasks))
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == newest_first
    assert sizes == [3, 3, 3, 1]
    listed = all_tasks(gateway, LISTER_TOKEN)
    assert [task.id for task in listed] == newest_first
    times = [task.enqueue_time.ToDatetime() for task in listed]
    assert times == sorted(times, reverse=True)
    assert [task.page for task in listed] == pages[::-1]

    failed = all_tasks(gateway, LISTER_TOKEN, status=FAILURE, page_size=2)
    assert [task.id for task in failed] == [ids[7], ids[4], ids[1]]
    assert all("404" in task.error for task in failed)
    succeeded = all_tasks(gateway, LISTER_TOKEN, status=SUCCESS)
    assert [task.page for task in succeeded] == [7, 6, 5, 4, 3, 2, 1]
    assert all_tasks(gateway, LISTER_TOKEN, status=REVOKED) == []
    # Other clients see none of them.
    assert not {task.id for task in all_tasks(gateway, OTHER_TOKEN)} & set(ids)

    first = list_tasks(gateway, LISTER_TOKEN, page_size=3)
    for changed in ({"status": FAILURE}, {"batch_id": str(uuid.uuid4())}):
        error = rpc_error(
            list_tasks,
            gateway,
            LISTER_TOKEN,
            page_size=3,
            page_token=first.next_page_token,
            **changed,
        )
        field, description = violation(error)
        assert field == "page_token" and "was made for" in description, description
    error = rpc_error(lambda: list_tasks(gateway, LISTER_TOKEN, page_token="garbled"))
    assert violation(error)[0] == "page_token"
    error = rpc_error(lambda: list_tasks(gateway, LISTER_TOKEN, batch_id="not-a-batch"))
    assert violation(error)[0] == "batch_id"
    field, description = violation(
        rpc_error(lambda: list_tasks(gateway, LISTER_TOKEN, page_size=-1))
    )
    assert field == "page_size" and "-1" in description

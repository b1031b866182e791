"""Scenario 14: batches (UploadPages) under faults: their counts stay the sum of their pages.

- a 40-page batch whose worker is SIGKILLed twice while Redis (appendonly, the test's own) is
  killed and restarted: every page SUCCESS, the batch's counts the sum of its pages' own
  results, the projects table exact;
- a 200-page batch cancelled mid-way under 2 workers: nothing starts or stores later than one
  checkpoint after CancelBatch answered, every page SUCCESS or REVOKED, a REVOKED page stored
  nothing;
- an until_known batch over 3 pages of new projects, then known ones: it stops at page 4 and
  fetches no page past 4 + UNTIL_KNOWN_WINDOW.

The sample site has SAMPLE_PAGES pages; the pages past them are served with `Site.set_page`
(projects numbered across pages as the sample's are), and each page's first answer is held
back by a script so that the faults land mid-batch.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select

from core.db import TaskRecord
from projects.v1 import queue_service_pb2, task_pb2
from sample_site.pages import DEFAULT_PER_PAGE, render_listing, sample_project
from tests.conftest import StackFactory, own_redis_server
from tests.faults.conftest import FAST_FAILURE
from tests.faults.ledger import Ledger, count_cancelled_batch, record, sample_links
from tests.support.processes import Gateway, Process, Site, poll_until
from tests.support.stack import TEST_TOKEN, Stack

METADATA = (("authorization", f"Bearer {TEST_TOKEN}"),)
SUCCESS = task_pb2.TASK_STATUS_SUCCESS
REVOKED = task_pb2.TASK_STATUS_REVOKED
RECEIVED = re.compile(r"Task projects\.v1\.harvest_page\[.*\] received")


def serve_pages(site: Site, pages: range, delay: float) -> None:
    """Pages `pages` listing projects numbered across pages, as the sample site's 1..20 do;
    each page's first answer held back `delay` s, any later one (a redelivery) at once."""
    for page in pages:
        first = (page - 1) * DEFAULT_PER_PAGE + 1
        body = render_listing([sample_project(n) for n in range(first, first + DEFAULT_PER_PAGE)])
        site.set_page(page, body, "text/html; charset=utf-8")
        if delay:
            site.script(
                page,
                [
                    {
                        "status": 200,
                        "headers": {"Content-Type": "text/html; charset=utf-8"},
                        "body": body,
                        "delay": delay,
                    }
                ],
            )


def upload_pages(
    gateway: Gateway, first: int, last: int, request_id: str, until_known: bool = False
) -> task_pb2.Batch:
    request = queue_service_pb2.UploadPagesRequest(
        first_page=first, last_page=last, request_id=request_id, until_known=until_known
    )
    return gateway.stub.UploadPages(request, metadata=METADATA, timeout=30).batch


def get_batch(gateway: Gateway, batch_id: str) -> task_pb2.Batch:
    request = queue_service_pb2.GetBatchRequest(id=batch_id)
    return gateway.stub.GetBatch(request, metadata=METADATA, timeout=10).batch


def batch_tasks(gateway: Gateway, batch_id: str) -> dict[int, task_pb2.Task]:
    """The batch's pages as ListTasks (batch_id filter, every page of the listing) has them."""
    tasks: dict[int, task_pb2.Task] = {}
    token = ""
    while True:
        request = queue_service_pb2.ListTasksRequest(
            page_size=100, page_token=token, batch_id=batch_id
        )
        response = gateway.stub.ListTasks(request, metadata=METADATA, timeout=10)
        for task in response.tasks:
            assert task.page not in tasks, f"page {task.page} listed twice"
            tasks[task.page] = task
        token = response.next_page_token
        if not token:
            return tasks


def watch_until_finished(gateway: Gateway, batch_id: str, timeout: float) -> task_pb2.Batch:
    """WatchBatch until its stream ends (after the batch's final state); that last state."""
    last: task_pb2.Batch | None = None
    stream = gateway.stub.WatchBatch(
        queue_service_pb2.WatchBatchRequest(id=batch_id), metadata=METADATA, timeout=timeout
    )
    try:
        for response in stream:
            last = response.batch
    except grpc.RpcError as error:
        pytest.fail(f"WatchBatch ended with {error.code()} before the batch finished: {error}")
    assert last is not None and last.HasField("finish_time"), f"stream ended at {last}"
    return last


def ledger_of(stack: Stack, gateway: Gateway, batch_id: str) -> Ledger:
    """A ledger that accepted the batch's pages, as ListTasks lists them."""
    ledger = Ledger(stack)
    for page, task in batch_tasks(gateway, batch_id).items():
        ledger.accepted[f"{batch_id}:{page}"] = task.id
        ledger.pages[f"{batch_id}:{page}"] = page
    return ledger


def results_sum(tasks: list[task_pb2.Task]) -> task_pb2.BatchTotals:
    """What the pages' own results add up to, as a batch's totals."""
    totals = task_pb2.BatchTotals()
    for task in tasks:
        if task.status == SUCCESS:
            totals.found += task.result.found
            totals.created += task.result.created
            totals.updated += task.result.updated
            totals.skipped += task.result.skipped
    return totals


def assert_counts_are_the_pages(batch: task_pb2.Batch, tasks: dict[int, task_pb2.Task]) -> None:
    listed = list(tasks.values())
    statuses = [t.status for t in listed]
    assert batch.pages_total == len(listed)
    assert batch.pages_succeeded == statuses.count(SUCCESS)
    assert batch.pages_failed == statuses.count(task_pb2.TASK_STATUS_FAILURE)
    assert batch.pages_cancelled == statuses.count(REVOKED)
    assert batch.totals == results_sum(listed), (batch.totals, results_sum(listed))


def seconds(timestamp: Timestamp) -> float:
    return timestamp.ToDatetime(tzinfo=dt.UTC).timestamp()


def deliveries(stack: Stack, batch_id: str) -> dict[int, int]:
    rows = stack._run(
        select(TaskRecord.page, TaskRecord.deliveries).where(TaskRecord.batch_id == batch_id)
    )
    return {int(row.page): int(row.deliveries) for row in rows}


def wait_held(stack: Stack, worker: Process) -> None:
    data = Path(stack.env["DATA_DIR"])
    markers = [
        data / f"failpoint-{point}-{worker.pid}" for point in ("before_fetch", "after_store")
    ]
    poll_until(lambda: all(m.exists() for m in markers), 60, 0.05, "both slots held")


def test_batch_survives_worker_kills_and_a_redis_restart(
    make_stack: StackFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each fault lands while the worker's 2 slots are held at failpoints, so that no BRPOP is
    in flight: kombu's Redis transport takes a message with BRPOP and records it as unacked in
    a second round trip, and a kill of Redis or of the worker between the two loses it (seen
    with the kill timed by a task's end, when the worker fetches its next message)."""
    pages = range(1, 41)
    with own_redis_server(tmp_path_factory.mktemp("redis"), appendonly=True) as redis_server:
        stack = make_stack(broker_url=redis_server.url, **FAST_FAILURE)
        serve_pages(stack.site, pages, delay=0.4)
        gateway = stack.start_gateway()
        first = stack.start_worker(
            "doomed-1", concurrency=2, FAILPOINTS="before_fetch=pause@5,after_store=pause@6"
        )
        batch = upload_pages(gateway, pages.start, pages.stop - 1, "kills-and-restart")
        assert batch.pages_total == len(pages)
        wait_held(stack, first)
        first.kill_group(signal.SIGKILL)  # page 5 before its fetch, page 6 stored, not ended
        second = stack.start_worker(
            "doomed-2", concurrency=2, FAILPOINTS="before_fetch=pause@12,after_store=pause@13"
        )
        wait_held(stack, second)
        seen = len(second.lines)
        redis_server.stop(signal.SIGKILL)  # queue, unacked messages and results: the AOF's
        redis_server.start()
        # Back on the new Redis, the worker takes 2 more messages (to its held pool): killed
        # once they are recorded, it is not between a BRPOP and its record either.
        second.wait_for_line(r"Connected to redis", timeout=30, start=seen)
        poll_until(
            lambda: sum(bool(RECEIVED.search(line)) for line in second.lines[seen:]) >= 2,
            30,
            0.05,
            "2 messages taken after the restart",
        )
        second.kill_group(signal.SIGKILL)
        stack.start_worker("rescuer", concurrency=4)
        ledger = ledger_of(stack, gateway, batch.id)
        assert len(ledger.accepted) == len(pages)
        ledger.settle(gateway, 60)
        counts = ledger.count(sample_links(stack.site.url, list(pages)))
        batch = get_batch(gateway, batch.id)
        tasks = batch_tasks(gateway, batch.id)
        redelivered = sum(1 for n in deliveries(stack, batch.id).values() if n > 1)
        record(
            "14. batch: 2 worker kills + Redis kill -9",
            f"{len(pages)}-page batch, worker SIGKILLed twice (slots held before a fetch and "
            "after a store), appendonly Redis SIGKILLed and restarted between; "
            f"{redelivered} pages delivered again; batch succeeded={batch.pages_succeeded} "
            f"found={batch.totals.found} created={batch.totals.created} = the pages' own results",
            counts,
        )
        assert counts.lost == 0 and counts.duplicated == 0
        assert counts.rows == len(pages) * DEFAULT_PER_PAGE
        assert counts.success == len(pages)
        assert_counts_are_the_pages(batch, tasks)
        assert batch.status == SUCCESS and batch.HasField("finish_time")
        assert batch.pages_succeeded == len(pages) and batch.totals.found == counts.rows
        assert redelivered > 0, "no page was delivered again: the kills hit nothing"


CANCEL_PAGES = range(1, 201)
CANCEL_WORKERS = 2
CANCEL_CONCURRENCY = 4
CANCEL_DELAY = 1.5
# One checkpoint: the longest a page running when CancelBatch answered takes from there to its
# checkpoint (its fetch, held back CANCEL_DELAY, and the parse), with room for a busy machine.
CHECKPOINT_SECONDS = CANCEL_DELAY + 2.0


def test_batch_cancelled_mid_way(fault_stack: Callable[..., Stack]) -> None:
    stack = fault_stack()
    serve_pages(stack.site, CANCEL_PAGES, delay=CANCEL_DELAY)
    gateway = stack.start_gateway()
    for index in range(CANCEL_WORKERS):
        stack.start_worker(f"worker-{index}", concurrency=CANCEL_CONCURRENCY)
    batch = upload_pages(gateway, CANCEL_PAGES.start, CANCEL_PAGES.stop - 1, "cancel-mid-way")
    poll_until(lambda: get_batch(gateway, batch.id).pages_succeeded >= 30, 60, 0.05, "30 pages")
    asked = time.time()
    cancelled = gateway.stub.CancelBatch(
        queue_service_pb2.CancelBatchRequest(id=batch.id), metadata=METADATA, timeout=10
    ).batch
    answered = time.time()
    hits_then = stack.site.hits()
    assert cancelled.status == REVOKED
    final = watch_until_finished(gateway, batch.id, 60)
    time.sleep(1.0)  # not for correctness: a late start after the batch's end would show
    tasks = batch_tasks(gateway, batch.id)
    hits = stack.site.hits()
    fetched_later = {p for p in CANCEL_PAGES if hits.get(p, 0) > hits_then.get(p, 0)}
    # Started after the answer: only pages a worker already held, ended at their start check.
    late = {
        p: t
        for p, t in tasks.items()
        if t.HasField("start_time") and seconds(t.start_time) > answered
    }
    latest_start = max(
        (seconds(t.start_time) - answered for t in tasks.values() if t.HasField("start_time")),
        default=0.0,
    )
    stored_late = [
        p for p, t in tasks.items() if t.status == SUCCESS and seconds(t.finish_time) > answered
    ]
    # A page's fetch is answered CANCEL_DELAY after its start at the earliest, and its
    # checkpoint comes after that: one that stored passed it before the cancel, so it started
    # at least CANCEL_DELAY before the answer.
    passed_late = [
        p
        for p, t in tasks.items()
        if t.status == SUCCESS and seconds(t.start_time) + CANCEL_DELAY > answered
    ]
    succeeded = sorted(p for p, t in tasks.items() if t.status == SUCCESS)
    revoked = [p for p, t in tasks.items() if t.status == REVOKED and t.error == "cancelled"]
    # Started before the answer and REVOKED: running at the cancel, stopped at the checkpoint.
    stopped = [
        p
        for p, t in tasks.items()
        if t.status == REVOKED and t.HasField("start_time") and seconds(t.start_time) <= answered
    ]
    site = stack.site.url
    counts, stored, expected = count_cancelled_batch(stack, site, tasks, succeeded, revoked)
    record(
        "14. batch cancelled mid-way",
        f"{len(CANCEL_PAGES)}-page batch, {CANCEL_WORKERS} workers x {CANCEL_CONCURRENCY}, "
        f"CancelBatch after {cancelled.pages_succeeded} pages (answered in "
        f"{(answered - asked) * 1000:.0f} ms): revoked={len(revoked)}; "
        f"{len(stopped)} running stopped at the checkpoint, {len(stored_late)} stored after "
        f"the answer, {len(late)} started after it, latest start "
        f"{latest_start:+.2f} s, {len(fetched_later)} fetched after it",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0 and counts.failure == 0
    assert len(tasks) == len(CANCEL_PAGES)
    assert {t.status for t in tasks.values()} <= {SUCCESS, REVOKED}
    assert revoked and succeeded, "the cancel did not land mid-way"
    assert stopped, "no page running at the cancel stopped at its checkpoint"
    assert final.status == REVOKED and final.pages_cancelled == len(revoked)
    assert_counts_are_the_pages(final, tasks)
    # A REVOKED page stored nothing: the table holds the succeeded pages' projects, exactly.
    assert stored == expected and counts.rows == len(expected)
    # No page starts later than one checkpoint after the answer, and one that starts after it
    # at all is a page a worker already held: REVOKED at its start check, never fetched.
    assert latest_start <= CHECKPOINT_SECONDS, f"a page started {latest_start:.2f} s after"
    assert all(t.status == REVOKED for t in late.values()), late
    assert not fetched_later & set(late), fetched_later & set(late)
    assert len(late) <= CANCEL_WORKERS * CANCEL_CONCURRENCY, sorted(late)
    # A page fetched after the answer was running already, and stopped at its checkpoint.
    assert all(tasks[p].status == REVOKED for p in fetched_later), fetched_later
    # Those that stored passed their checkpoint before the cancel, and were done within one
    # checkpoint of the answer.
    assert not passed_late, f"pages {passed_late} stored though their checkpoint came after"
    for page in stored_late:
        assert seconds(tasks[page].finish_time) - answered <= CHECKPOINT_SECONDS, page


KNOWN_PAGES = range(4, 13)
WINDOW = 4


def test_until_known_stops_at_the_first_known_page(fault_stack: Callable[..., Stack]) -> None:
    stack = fault_stack(UNTIL_KNOWN_WINDOW=str(WINDOW))
    gateway = stack.start_gateway()
    stack.start_worker(concurrency=4)
    # Pages 4..12 harvested before (a batch of their own): known from then on.
    earlier = upload_pages(gateway, KNOWN_PAGES.start, KNOWN_PAGES.stop - 1, "known-before")
    assert watch_until_finished(gateway, earlier.id, 60).pages_succeeded == len(KNOWN_PAGES)
    hits_before = stack.site.hits()
    # Page 4, the first known one, answers slowly: the window runs ahead of it meanwhile.
    stack.site.script(
        4,
        [{"status": 200, "headers": {"Content-Type": "text/html; charset=utf-8"},
          "body": render_listing([sample_project(n) for n in range(31, 41)]), "delay": 1.5}],
    )  # fmt: skip
    batch = upload_pages(gateway, 1, 20, "until-known", until_known=True)
    assert batch.pages_total == WINDOW  # the first window, enqueued at once
    final = watch_until_finished(gateway, batch.id, 60)
    time.sleep(1.0)  # not for correctness: a page enqueued after the end would be fetched now
    hits = stack.site.hits()
    fetched = sorted(p for p, n in hits.items() if n > hits_before.get(p, 0))
    tasks = batch_tasks(gateway, batch.id)
    ledger = ledger_of(stack, gateway, batch.id)
    ledger.settle(gateway, 30)
    counts = ledger.count(sample_links(stack.site.url, [1, 2, 3, *KNOWN_PAGES]))
    record(
        "14. batch until_known",
        f"3 new pages then known ones, window {WINDOW}, page 4 slow: stop_page="
        f"{final.stop_page}, {final.pages_total} pages run, fetched {fetched}, created "
        f"{final.totals.created}",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0
    assert final.stop_page == 4 and final.status == SUCCESS
    assert final.totals.created == 3 * DEFAULT_PER_PAGE
    assert max(fetched) <= 4 + WINDOW, fetched
    assert fetched == sorted(tasks), (fetched, sorted(tasks))
    assert max(tasks) > 4, "the window never ran ahead of the slow page"
    assert_counts_are_the_pages(final, tasks)
    assert counts.rows == (3 + len(KNOWN_PAGES)) * DEFAULT_PER_PAGE

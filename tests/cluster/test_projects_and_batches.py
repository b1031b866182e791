"""Issue 21's additions once ProjectService and batches exist, on the shared cluster.

- A WatchProjects client on gw1 (harvester.Client.watch_projects, which resumes from the last
  cursor it received) sees every project stored by the workers on 4 hosts exactly once, while
  gw1 is restarted under its open stream.
- A 400-page batch started on gw1, watched (WatchBatch) and cancelled (CancelBatch) on gw2.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from harvester import Client
from projects.v1 import task_pb2
from tests.cluster.harness import Cluster
from tests.cluster.scenarios import settle_through
from tests.faults.ledger import Ledger, count_cancelled_batch, record, sample_links
from tests.faults.test_batch_faults import (
    assert_counts_are_the_pages,
    batch_tasks,
    get_batch,
    upload_pages,
    watch_until_finished,
)
from tests.support.processes import poll_until
from tests.support.stack import TEST_TOKEN

pytestmark = pytest.mark.timeout(600)

SUCCESS = task_pb2.TASK_STATUS_SUCCESS
REVOKED = task_pb2.TASK_STATUS_REVOKED


class ProjectWatcher:
    """harvester.Client.watch_projects from the beginning, in a thread, every change kept."""

    def __init__(self, address: str) -> None:
        self.client = Client(address, TEST_TOKEN)
        self.urls: list[str] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for change in self.client.watch_projects(from_beginning=True):
                with self._lock:
                    self.urls.append(change.project.url)
        except BaseException as error:
            self.error = error

    def seen(self) -> list[str]:
        with self._lock:
            return list(self.urls)

    def close(self) -> None:
        self.client.close()
        self._thread.join(10)


def test_watch_projects_on_gw1_sees_every_project_once_across_its_restart(
    hosts: Cluster,
) -> None:
    c = hosts
    pages = list(range(1, 121))
    sentinel = len(pages) + 1
    c.site.behave(pages=sentinel, delay=1.0)  # the harvest goes on while gw1 restarts
    gw1, gw2 = c.gateways["gw1"], c.gateways["gw2"]
    done_before = {h: c.workers[h].output().count("succeeded in") for h in c.workers}
    watcher = ProjectWatcher(gw1.address)
    ledger = Ledger(c.stack)
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: ledger.upload(gw2, p, f"wp-{p}"), pages))
        poll_until(lambda: len(watcher.seen()) >= 200, 180, 0.05, "200 changes on gw1's stream")
        seen_at_restart = len(watcher.seen())
        c.stop_gateway("gw1")  # SIGTERM: its open streams end UNAVAILABLE
        c.start_gateway("gw1")  # the same address; the client resumes from its cursor
        settle_through(ledger, lambda rid: gw2, 300)
        # Nothing may come after the last project: a sentinel page stored after all the
        # others arrives last in commit order, so once its links are in, the rest are too.
        ledger.upload(gw2, sentinel, f"wp-{sentinel}")
        settle_through(ledger, lambda rid: gw2, 120)
        sentinel_links = sample_links(c.site.url, [sentinel])
        poll_until(
            lambda: sentinel_links <= set(watcher.seen()), 60, 0.1, "the sentinel's projects"
        )
    finally:
        watcher.close()
    urls = watcher.seen()
    expected = sample_links(c.site.url, [*pages, sentinel])
    counts = ledger.count(expected)
    per_worker = {
        h: c.workers[h].output().count("succeeded in") - done_before[h] for h in c.workers
    }
    record(
        "WatchProjects on gw1 through gw1's restart",
        f"{len(pages)} pages + a sentinel by workers {per_worker}; gw1 restarted after "
        f"{seen_at_restart} changes; the stream saw {len(urls)} changes, "
        f"{len(set(urls))} distinct, stream error {watcher.error!r}",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0, counts
    assert set(urls) == expected, f"missing {len(expected - set(urls))}"
    assert len(urls) == len(expected), f"{len(urls) - len(set(urls))} changes came twice"
    assert all(n > 0 for n in per_worker.values()), per_worker


def test_400_page_batch_started_on_gw1_watched_and_cancelled_on_gw2(hosts: Cluster) -> None:
    c = hosts
    pages = range(1, 401)
    c.site.behave(pages=len(pages), delay=0.5)
    gw1, gw2 = c.gateways["gw1"], c.gateways["gw2"]
    batch = upload_pages(gw1, pages.start, pages.stop - 1, "cluster-batch")
    watched: list[task_pb2.Batch] = []
    watch_errors: list[BaseException] = []

    def watch() -> None:
        try:
            watched.append(watch_until_finished(gw2, batch.id, 150))
        except BaseException as error:
            watch_errors.append(error)

    watching = threading.Thread(target=watch, daemon=True)
    watching.start()
    poll_until(lambda: get_batch(gw2, batch.id).pages_succeeded >= 40, 180, 0.1, "40 pages")
    # Through the client library, as a user would cancel: it asks again on UNAVAILABLE (a
    # cancel is safe to repeat), which a cancel of hundreds of pages met once beside busy
    # workers ("the task database is unreachable; retry shortly").
    with Client(gw2.address, TEST_TOKEN) as client:
        cancelled = client.cancel(batch.id)
    assert isinstance(cancelled, task_pb2.Batch) and cancelled.status == REVOKED
    watching.join(160)
    tasks = batch_tasks(gw2, batch.id)
    unfinished = {
        p: task_pb2.TaskStatus.Name(t.status)
        for p, t in tasks.items()
        if not t.HasField("finish_time")
    }
    assert watched, f"WatchBatch on gw2: {watch_errors}; pages not finished: {unfinished}"
    final = watched[0]
    succeeded = sorted(p for p, t in tasks.items() if t.status == SUCCESS)
    revoked = [p for p, t in tasks.items() if t.status == REVOKED]
    counts, stored, expected = count_cancelled_batch(c.stack, c.site.url, tasks, succeeded, revoked)
    record(
        "400-page batch: UploadPages on gw1, WatchBatch and CancelBatch on gw2",
        f"cancelled after {cancelled.pages_succeeded} pages; final {final.pages_succeeded} "
        f"succeeded, {final.pages_cancelled} cancelled",
        counts,
    )
    assert final.status == REVOKED
    assert len(tasks) == len(pages)
    assert {t.status for t in tasks.values()} <= {SUCCESS, REVOKED}
    assert counts.lost == 0 and counts.duplicated == 0 and counts.failure == 0, counts
    assert revoked and succeeded, "the cancel did not land mid-way"
    assert_counts_are_the_pages(final, tasks)
    assert stored == expected and counts.rows == len(expected)

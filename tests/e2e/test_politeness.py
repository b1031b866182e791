"""Politeness to the source, judged by the source: real gateway, workers and sample site, driven
through gRPC, and the site's own log of every request with its arrival time.

The fleet's budget (worker/politeness.py) against a site that answers 429 past its caps; a
worker killed holding a slot; Retry-After pausing the fleet; robots.txt (disallow, Crawl-delay,
RFC 9309's 4xx and 5xx); the conditional GET and its 304.
"""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.settings import DEFAULT_USER_AGENT
from projects.v1 import task_pb2
from sample_site.pages import render_listing, sample_page
from tests.conftest import own_redis_server, stacks_in
from tests.e2e.test_batches import upload_pages, wait_for_batch
from tests.support.processes import Site, SiteRequest, poll_until, start_site
from tests.support.services import postgres_database
from tests.support.stack import Stack, upload, wait_for_task
from worker.politeness import LATE_SEND_SECONDS

SUCCESS = task_pb2.TASK_STATUS_SUCCESS
FAILURE = task_pb2.TASK_STATUS_FAILURE
PER_PAGE = 10


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = start_site(tmp_path)
    try:
        yield site
    finally:
        site.process.stop()


@pytest.fixture
def make_stack(
    tmp_path: Path, site: Site, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Stack]]:
    """Stacks on the test's own Redis and SQLite, sharing `site`."""
    with (
        own_redis_server(tmp_path / "redis") as redis_server,
        stacks_in(tmp_path, site, lambda: request.session.testsfailed > 0) as make,
    ):
        yield lambda **extra: make(broker_url=redis_server.url, **extra)


def page_requests(site: Site) -> list[SiteRequest]:
    return [r for r in site.requests() if r.path.startswith("/projects")]


def most_in_any_second(arrivals: list[float]) -> int:
    """The most arrivals within any half-open second [t, t + 1), t an arrival."""
    arrivals = sorted(arrivals)
    most = 0
    end = 0
    for start, first in enumerate(arrivals):
        while end < len(arrivals) and arrivals[end] < first + 1.0:
            end += 1
        most = max(most, end - start)
    return most


def most_at_once(requests: list[SiteRequest]) -> int:
    """The most requests the site had in flight at one moment (arrival to departure)."""
    events = sorted(
        [(r.arrival, 1) for r in requests] + [(r.departure, -1) for r in requests],
        key=lambda event: (event[0], event[1]),  # a departure before an arrival at a tie
    )
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


# --- the fleet's budget -------------------------------------------------------------------


@pytest.mark.postgres
def test_four_workers_keep_to_the_sites_rate_and_concurrency(
    tmp_path: Path, site: Site, request: pytest.FixtureRequest
) -> None:
    pages = 200
    site.behave(pages=pages, max_requests_per_second=10, max_concurrency=4, delay=0.05)
    with (
        own_redis_server(tmp_path / "redis") as redis_server,
        postgres_database() as database_url,
        stacks_in(tmp_path, site, lambda: request.session.testsfailed > 0) as make,
    ):
        stack = make(
            broker_url=redis_server.url,
            database_url=database_url,
            SOURCE_MAX_REQUESTS_PER_SECOND="10",
            SOURCE_MAX_CONCURRENCY="4",
            # Lean on the machine's shared PostgreSQL (max_connections 100): 10 pages a second
            # need few connections.
            WORKER_DB_CONNECTIONS="2",
            WORKER_RECORD_CONNECTIONS="2",
        )
        gateway = stack.start_gateway()
        for n in range(4):
            stack.start_worker(f"w{n}", concurrency=16)
        started = time.monotonic()
        batch = upload_pages(gateway, 1, pages)
        done = wait_for_batch(gateway, batch.id, timeout=90)
        took = time.monotonic() - started

        assert done.status == SUCCESS, done
        assert done.pages_succeeded == pages
        assert done.totals.found == done.totals.created == pages * PER_PAGE
        projects = stack.projects()
        expected = {
            f"{site.url}{project.href}": project.title
            for page in range(1, pages + 1)
            for project in sample_page(page, pages=pages)
        }
        assert {url: row.title for url, row in projects.items()} == expected

        requests = site.requests()
        refused = [r for r in requests if r.status == 429]
        assert refused == [], " ".join(
            f"{r.path}@{r.arrival - refused[0].arrival:+.3f}"
            for r in requests
            if refused[0].arrival - 1.2 < r.arrival < refused[0].arrival + 0.2
        )
        assert most_in_any_second([r.arrival for r in requests]) <= 10
        assert most_at_once(requests) <= 4
        assert {r.user_agent for r in requests} == {DEFAULT_USER_AGENT}
        listing = [r for r in requests if r.path.startswith("/projects")]
        assert len(listing) == pages  # each page once: no 429, no retry
        # The budget is used, not only kept: 200 pages at 10/s is 20 s.
        assert took < 40, f"{pages} pages took {took:.1f} s"


def test_a_worker_killed_holding_the_only_slot_blocks_the_fleet_for_at_most_the_lease(
    make_stack: Callable[..., Stack], site: Site
) -> None:
    lease = 3.0
    stack = make_stack(
        SOURCE_MAX_CONCURRENCY="1",
        SOURCE_LEASE_SECONDS=str(lease),
        FETCH_TIMEOUT_SECONDS="2",
    )
    gateway = stack.start_gateway()
    first = stack.start_worker("first", concurrency=2)
    second = stack.start_worker("second", concurrency=2)
    # Page 1 hangs at the site: whoever fetches it holds the fleet's one slot.
    site.script(1, [{"status": 200, "body": "late", "delay": 30}])
    upload(gateway, 1)
    held = poll_until(
        lambda: [r for r in page_requests(site) if r.path == "/projects?page=1"], 20, 0.02
    )[0]
    holder = poll_until(
        lambda: next((w for w in (first, second) if "] received" in w.output()), None),
        10,
        0.02,
        "the worker that took page 1",
    )
    holder.kill_group(signal.SIGKILL)
    asked = time.time()  # the site's log is in time.time() too
    task = upload(gateway, 2)
    done = wait_for_task(gateway, task.id, timeout=30)

    assert done.status == SUCCESS, done
    assert asked < held.arrival + lease - 0.5, "too slow to judge: page 2 asked for after the lease"
    second_fetch = next(r for r in page_requests(site) if r.path == "/projects?page=2")
    blocked = second_fetch.arrival - held.arrival
    # The dead worker's slot held the fleet off until its lease ran out, and no longer.
    assert lease - 0.25 <= blocked <= lease + 1.0, f"page 2 waited {blocked:.2f} s"


def test_retry_after_pauses_the_whole_fleet(make_stack: Callable[..., Stack], site: Site) -> None:
    stack = make_stack()
    gateway = stack.start_gateway()
    stack.start_worker(concurrency=4)
    site.script(1, [{"status": 429, "headers": {"Retry-After": "2"}, "body": "busy"}])
    first = upload(gateway, 1)
    refused = poll_until(lambda: [r for r in page_requests(site) if r.status == 429], 20, 0.02)[0]
    others = [upload(gateway, page) for page in (2, 3, 4)]
    results = [wait_for_task(gateway, task.id, timeout=30) for task in [first, *others]]

    assert [r.status for r in results] == [SUCCESS] * 4
    later = [r for r in page_requests(site) if r.arrival > refused.arrival]
    assert len(later) == 4  # page 1 again, and pages 2..4
    # Not only page 1's retry: every request of the fleet waited out the pause.
    assert min(r.arrival for r in later) - refused.arrival >= 2.0 - 0.05


# --- robots.txt ---------------------------------------------------------------------------


def test_robots_disallow_fails_the_page_without_fetching_it(
    make_stack: Callable[..., Stack], site: Site
) -> None:
    site.set_robots(
        200,
        "User-agent: *\nDisallow: /\n\n"  # everyone else: nothing
        "User-agent: projects-harvester\nDisallow: /projects?page=2$\nAllow: /\n",
    )
    stack = make_stack()
    gateway = stack.start_gateway()
    stack.start_worker(concurrency=2)
    allowed, disallowed = upload(gateway, 1), upload(gateway, 2)
    allowed_done = wait_for_task(gateway, allowed.id)
    disallowed_done = wait_for_task(gateway, disallowed.id)

    assert allowed_done.status == SUCCESS and allowed_done.result.created == PER_PAGE
    assert disallowed_done.status == FAILURE
    assert disallowed_done.error == "robots.txt disallows /projects?page=2 for projects-harvester"
    requests = site.requests()
    assert [r.path for r in requests if r.path.startswith("/projects")] == ["/projects?page=1"]
    robots = [r for r in requests if r.path == "/robots.txt"]
    assert len(robots) == 1 and robots[0].user_agent == DEFAULT_USER_AGENT


def test_crawl_delay_spaces_the_fleets_requests(
    make_stack: Callable[..., Stack], site: Site
) -> None:
    site.set_robots(200, "User-agent: *\nCrawl-delay: 0.5\n")
    stack = make_stack()  # the budget itself allows 10,000 requests a second here
    gateway = stack.start_gateway()
    stack.start_worker("w1", concurrency=4)
    stack.start_worker("w2", concurrency=4)
    tasks = [upload(gateway, page) for page in range(1, 7)]
    assert [wait_for_task(gateway, t.id).status for t in tasks] == [SUCCESS] * 6

    arrivals = sorted(r.arrival for r in page_requests(site))
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(arrivals) == 6
    # A request may leave up to LATE_SEND_SECONDS after its start, the next one on time.
    assert min(gaps) >= 0.5 - LATE_SEND_SECONDS - 0.02, gaps


def test_robots_5xx_disallows_everything_for_a_while_and_4xx_allows_everything(
    make_stack: Callable[..., Stack], site: Site
) -> None:
    site.set_robots(503, "down")
    # ROBOTS_TTL_SECONDS / 10: an unreadable robots.txt is tried again after 1 s.
    stack = make_stack(ROBOTS_TTL_SECONDS="10", RETRY_MAX_TRIES="2")
    gateway = stack.start_gateway()
    stack.start_worker(concurrency=2)
    refused = wait_for_task(gateway, upload(gateway, 1).id)

    assert refused.status == FAILURE
    assert "robots.txt answered 503" in refused.error and "RFC 9309" in refused.error
    assert page_requests(site) == []  # nothing fetched while robots.txt could not be read
    robots_reads = [r for r in site.requests() if r.path == "/robots.txt"]
    assert len(robots_reads) == 2  # read again when the first try's verdict ran out

    site.set_robots(403, "no robots for you")  # RFC 9309: a 4xx means no rules at all
    allowed = wait_for_task(gateway, upload(gateway, 1).id)
    assert allowed.status == SUCCESS and allowed.result.created == PER_PAGE
    assert [r.path for r in page_requests(site)] == ["/projects?page=1"]


# --- conditional GET ----------------------------------------------------------------------


def test_a_re_harvest_is_a_conditional_get_and_a_304_refreshes_last_seen(
    make_stack: Callable[..., Stack], site: Site
) -> None:
    site.behave(validators=True)
    stack = make_stack()
    gateway = stack.start_gateway()
    stack.start_worker(concurrency=2)
    first = wait_for_task(gateway, upload(gateway, 3).id)
    assert first.status == SUCCESS and first.result.created == PER_PAGE
    assert not first.result.not_modified
    seen_first = {url: row.last_seen_at for url, row in stack.projects().items()}

    again = wait_for_task(gateway, upload(gateway, 3).id)

    assert again.status == SUCCESS
    assert again.result == task_pb2.UploadResult(page=3, found=PER_PAGE, not_modified=True)
    fetches = page_requests(site)
    assert [r.status for r in fetches] == [200, 304]
    assert fetches[0].if_none_match is None
    assert fetches[1].if_none_match is not None and fetches[1].if_modified_since is not None
    seen_again = {url: row.last_seen_at for url, row in stack.projects().items()}
    assert seen_again.keys() == seen_first.keys() and len(seen_again) == PER_PAGE
    assert all(seen_again[url] > seen_first[url] for url in seen_first)
    assert all(isinstance(when, dt.datetime) for when in seen_again.values())

    # A changed page has a new ETag: fetched and parsed in full.
    site.set_page(3, render_listing(sample_page(4)), "text/html; charset=utf-8")
    third = wait_for_task(gateway, upload(gateway, 3).id)
    assert third.status == SUCCESS and not third.result.not_modified
    assert third.result.found == PER_PAGE and third.result.created == PER_PAGE
    assert [r.status for r in page_requests(site)] == [200, 304, 200]

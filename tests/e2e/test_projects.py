"""ProjectService through the generated stubs against real processes, on SQLite and PostgreSQL.

Paging 2,500 stored projects in every order and filter gives what a plain SQL query gives;
WatchProjects sees every project of a 20-page harvest by two workers exactly once while the
watcher is cut and resumes, and across a gateway restart; and the status codes a client meets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from sqlalchemy import bindparam, text

from core.db import UtcDateTime, create_engine
from core.migrate import upgrade_to_head
from gateway.tokens import TokenSigner
from projects.v1 import project_pb2, project_service_pb2, project_service_pb2_grpc
from sample_site.pages import render_listing, sample_page
from tests.conftest import own_redis_server, stacks_in
from tests.support.idle_proxy import IdleCuttingProxy
from tests.support.processes import Gateway, Site, start_site
from tests.support.projects import project_item
from tests.support.services import postgres_database
from tests.support.stack import TEST_TOKEN, Stack, rpc_detail, upload, wait_for_task
from worker.store import store_projects

METADATA = (("authorization", f"Bearer {TEST_TOKEN}"),)
POSTGRES = pytest.param("postgresql", marks=pytest.mark.postgres)
PROJECTS = 2_500
WATCHED_PAGES = 20
PER_PAGE = 10  # the sample site's projects per page
ChangeType = project_pb2.ChangeType


@pytest.fixture(params=["sqlite", POSTGRES])
def make_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Stacks on one site, one Redis of the test's own and a fresh database of the kind."""
    site = start_site(tmp_path)
    try:
        with (
            own_redis_server(tmp_path / "redis") as redis_server,
            stacks_in(tmp_path, site, lambda: request.session.testsfailed > 0) as make,
            postgres_database() if request.param == "postgresql" else _no_database() as url,
        ):
            yield lambda **extra: make(broker_url=redis_server.url, database_url=url, **extra)
    finally:
        site.process.stop()


class _no_database:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# --- paging --------------------------------------------------------------------------------


def fill(database_url: str) -> dt.datetime:
    """2,500 projects stored as a worker stores them, in five harvests, then 300 changed.

    Titles and descriptions carry words to search for in mixed case; every other project has
    no start date; many share a store's timestamp, so ids must break ties. Returns a moment
    between the first stores and the changes, for updated_after.
    """

    async def go() -> dt.datetime:
        engine = create_engine(database_url)
        try:
            await upgrade_to_head(engine)
            words = ["Robot arm", "garden BOT", "river clean-up", "bakery", "Chatbot tutor"]
            items = [
                project_item(
                    n,
                    title=f"{words[n % 5]} #{n}",
                    description=f"about {words[(n * 3) % 5].lower()} and more",
                    is_active=n % 3 != 0,
                )
                for n in range(PROJECTS)
            ]
            for start in range(0, PROJECTS, 500):
                await store_projects(engine, items[start : start + 500], 200)
            middle = dt.datetime.now(dt.UTC)
            changed = [
                project_item(n, title=f"changed{' Bot' * (n % 4 == 0)} #{n}", is_active=n % 2 == 0)
                for n in range(0, PROJECTS, PROJECTS // 300)
            ]
            await store_projects(engine, changed, 200)
            return middle
        finally:
            await engine.dispose()

    result: dt.datetime = run(go())
    return result


ORDER_SQL = {
    "update_time desc": "updated_at DESC, id DESC",
    "create_time desc": "first_seen_at DESC, id DESC",
    "start_date desc": "CASE WHEN start_date IS NULL THEN 1 ELSE 0 END, start_date DESC, id DESC",
    "url": "url",
}


def sql_ids(
    database_url: str, order_by: str, is_active: bool | None, after: dt.datetime | None, q: str
) -> list[int]:
    """The ids a plain SQL query gives for these filters and order (no pages, no keyset)."""
    where = ["1 = 1"]
    params: dict[str, Any] = {}
    if is_active is not None:
        where.append("is_active = :active")
        params["active"] = is_active
    if after is not None:
        where.append("updated_at > :after")
        params["after"] = after
    if q:
        where.append("(lower(title) LIKE :q OR lower(description) LIKE :q)")
        params["q"] = f"%{q.lower()}%"
    statement = text(
        f"SELECT id FROM projects WHERE {' AND '.join(where)} ORDER BY {ORDER_SQL[order_by]}"
    )
    if after is not None:
        statement = statement.bindparams(bindparam("after", type_=UtcDateTime()))

    async def go() -> list[int]:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                return [row.id for row in await conn.execute(statement, params)]
        finally:
            await engine.dispose()

    ids: list[int] = run(go())
    return ids


def paged_ids(gateway: Gateway, page_size: int, **request: Any) -> list[int]:
    ids: list[int] = []
    token = ""
    while True:
        page = gateway.projects.ListProjects(
            project_service_pb2.ListProjectsRequest(
                page_size=page_size, page_token=token, **request
            ),
            metadata=METADATA,
            timeout=30,
        )
        ids.extend(project.id for project in page.projects)
        assert len(page.projects) <= page_size
        if not page.next_page_token:
            return ids
        assert len(page.projects) == min(page_size, 1000)  # full pages but the last
        token = page.next_page_token


def test_paging_gives_what_sql_gives_in_every_order_and_filter(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    middle = fill(stack.database_url)
    gateway = stack.start_gateway()
    since = timestamp_pb2.Timestamp()
    since.FromDatetime(middle)
    filters: list[tuple[dict[str, Any], tuple[bool | None, dt.datetime | None, str]]] = [
        ({}, (None, None, "")),
        ({"is_active": True}, (True, None, "")),
        ({"is_active": False}, (False, None, "")),
        ({"updated_after": since}, (None, middle, "")),
        ({"query": "bot"}, (None, None, "bot")),
        ({"query": "BOT", "is_active": True, "updated_after": since}, (True, middle, "bot")),
    ]
    for order_by in ORDER_SQL:
        for request, (active, after, q) in filters:
            expected = sql_ids(stack.database_url, order_by, active, after, q)
            assert expected, f"the data has rows for {order_by} {request}"
            got = paged_ids(gateway, 173, order_by=order_by, **request)
            assert got == expected, f"order_by {order_by!r}, filters {request}"
    # The default order, and the biggest page.
    everything = sql_ids(stack.database_url, "update_time desc", None, None, "")
    assert len(everything) == PROJECTS
    assert paged_ids(gateway, 1000) == everything
    assert paged_ids(gateway, 5000) == everything  # read as 1000


def test_a_page_token_is_refused_with_other_filters_or_altered(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    fill(stack.database_url)
    gateway = stack.start_gateway()
    first = gateway.projects.ListProjects(
        project_service_pb2.ListProjectsRequest(page_size=10, query="bot"), metadata=METADATA
    )
    token = first.next_page_token
    assert token
    for changed, field in (
        ({"query": "robot"}, "query"),
        ({"query": "bot", "is_active": True}, "is_active"),
        ({"query": "bot", "order_by": "url"}, "order_by"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            gateway.projects.ListProjects(
                project_service_pb2.ListProjectsRequest(page_size=10, page_token=token, **changed),
                metadata=METADATA,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violation = rpc_detail(caught.value, error_details_pb2.BadRequest).field_violations[0]
        assert violation.field == "page_token"
        assert f"was made for {field}" in violation.description
    altered = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    with pytest.raises(grpc.RpcError) as caught:
        gateway.projects.ListProjects(
            project_service_pb2.ListProjectsRequest(page_size=10, page_token=altered, query="bot"),
            metadata=METADATA,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (caught.value.details() or "")


# --- watching ------------------------------------------------------------------------------


def slow_pages(site: Site, pages: range, delay: float) -> None:
    """Each page answers after `delay`, so the harvest runs while the watcher reads."""
    for page in pages:
        site.script(
            page,
            [
                {
                    "status": 200,
                    "headers": {"Content-Type": "text/html; charset=utf-8"},
                    "body": render_listing(sample_page(page)),
                    "delay": delay,
                }
            ],
        )


class Watcher:
    """A client of WatchProjects that keeps its last cursor, as a resuming client does."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.cursor = ""
        self.changes: list[project_service_pb2.ProjectChange] = []
        self.ended: list[grpc.StatusCode] = []

    def watch(self, until: int, from_beginning: bool = False, timeout: float = 120) -> None:
        """Read until `until` changes are held in all, then cut the stream (or until it ends).

        A response carries every change the gateway had for the stream when it sent it, so a
        cut comes after a response, at `until` changes or past it.
        """
        call = self.gateway.projects.WatchProjects(
            project_service_pb2.WatchProjectsRequest(
                cursor=self.cursor, from_beginning=from_beginning and not self.cursor
            ),
            metadata=METADATA,
            timeout=timeout,
        )
        try:
            for response in call:
                assert response.changes, "a response with no changes"
                self.changes.extend(response.changes)
                self.cursor = response.cursor
                if len(self.changes) >= until:
                    call.cancel()  # type: ignore[no-untyped-call]
                    return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.ended.append(error.code())


def test_a_watcher_cut_five_times_and_a_gateway_restart_sees_every_project_once(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    expected_total = WATCHED_PAGES * PER_PAGE
    pages = range(1, WATCHED_PAGES + 1)
    slow_pages(stack.site, pages, 0.3)
    gateway = stack.start_gateway()
    stack.start_worker("w1", concurrency=2)
    stack.start_worker("w2", concurrency=2)
    watcher = Watcher(gateway)
    rng = random.Random(1234)
    cuts = sorted(rng.sample(range(5, expected_total - 5), 5))
    restart_after = cuts[2] + (cuts[3] - cuts[2]) // 2

    tasks = [upload(gateway, page).id for page in pages]
    # The first stream starts from the beginning, the rest from the cursor they were cut at.
    watcher.watch(cuts[0], from_beginning=True)
    for until in cuts[1:3]:
        watcher.watch(until)

    # The gateway goes away under an open stream (SIGTERM: the stream ends UNAVAILABLE),
    # and a new one, on another port, serves the rest from the same cursor.
    def stop_the_gateway_mid_stream() -> None:
        _wait_for(lambda: len(watcher.changes) >= restart_after)
        gateway.process.send(signal.SIGTERM)

    stopper = threading.Thread(target=stop_the_gateway_mid_stream, daemon=True)
    stopper.start()
    watcher.watch(expected_total)
    stopper.join(30)
    assert watcher.ended == [grpc.StatusCode.UNAVAILABLE], watcher.ended
    assert gateway.process.popen.wait(30) == 0
    gateway = stack.start_gateway("gateway-2")
    watcher.gateway = gateway
    for until in [*cuts[3:], expected_total]:
        if until > len(watcher.changes):
            watcher.watch(until)
    for task_id in tasks:
        assert wait_for_task(gateway, task_id).result.created == PER_PAGE

    urls = [change.project.url for change in watcher.changes]
    assert len(urls) == expected_total, f"{len(urls)} changes"
    assert len(set(urls)) == expected_total, "a project came twice"
    assert {change.change_type for change in watcher.changes} == {ChangeType.CHANGE_TYPE_CREATED}
    stored = stack.projects()
    assert set(urls) == set(stored)
    for change in watcher.changes:
        row = stored[change.project.url]
        assert (change.project.id, change.project.title) == (row.id, row.title)
        assert change.project.is_active == row.is_active
    # Nothing more is waiting after the last cursor: the stream stays open and idle.
    watcher.watch(expected_total + 1, timeout=3)
    assert len(watcher.changes) == expected_total
    assert watcher.ended[-1] == grpc.StatusCode.DEADLINE_EXCEEDED


def _wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --- status codes, and what a stream does when it lags or the gateway stops ---------------


@pytest.fixture
def sqlite_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    site = start_site(tmp_path)
    try:
        with (
            own_redis_server(tmp_path / "redis") as redis_server,
            stacks_in(tmp_path, site, lambda: request.session.testsfailed > 0) as make,
        ):
            yield lambda **extra: make(broker_url=redis_server.url, **extra)
    finally:
        site.process.stop()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def first_of(stream: Any) -> Any:
    return next(iter(stream))


def each_change(
    responses: Iterable[project_service_pb2.WatchProjectsResponse],
) -> Iterator[project_service_pb2.ProjectChange]:
    for response in responses:
        yield from response.changes


def test_every_status_code_of_project_service(sqlite_stack: Callable[..., Stack]) -> None:
    stack = sqlite_stack()
    gateway = stack.start_gateway(WATCH_MAX_STREAMS_PER_CLIENT="2")
    stack.start_worker()
    wait_for_task(gateway, upload(gateway, 1).id)
    listed = gateway.projects.ListProjects(
        project_service_pb2.ListProjectsRequest(order_by="url"), metadata=METADATA
    ).projects
    assert len(listed) == PER_PAGE
    rpcs = gateway.projects

    def code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
        error = rpc_error(call)
        return error.code(), error.details() or ""

    got = rpcs.GetProject(
        project_service_pb2.GetProjectRequest(url=listed[0].url), metadata=METADATA
    )
    assert got.project == listed[0]
    got = rpcs.GetProject(project_service_pb2.GetProjectRequest(id=listed[1].id), metadata=METADATA)
    assert got.project == listed[1]
    assert (
        code(
            lambda: rpcs.GetProject(
                project_service_pb2.GetProjectRequest(id=10**9), metadata=METADATA
            )
        )[0]
        == grpc.StatusCode.NOT_FOUND
    )
    status, message = code(
        lambda: rpcs.GetProject(project_service_pb2.GetProjectRequest(), metadata=METADATA)
    )
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "id or by its url" in message
    status, message = code(
        lambda: rpcs.ListProjects(
            project_service_pb2.ListProjectsRequest(page_size=-1), metadata=METADATA
        )
    )
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in message
    status, message = code(
        lambda: rpcs.ListProjects(
            project_service_pb2.ListProjectsRequest(order_by="title"), metadata=METADATA
        )
    )
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert "'update_time desc', 'create_time desc', 'start_date desc', 'url'" in message
    assert (
        code(lambda: rpcs.ListProjects(project_service_pb2.ListProjectsRequest()))[0]
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        code(
            lambda: first_of(
                rpcs.WatchProjects(project_service_pb2.WatchProjectsRequest(), timeout=5)
            )
        )[0]
        == grpc.StatusCode.UNAUTHENTICATED
    )

    def watch(**request: Any) -> Any:
        return rpcs.WatchProjects(
            project_service_pb2.WatchProjectsRequest(**request), metadata=METADATA, timeout=10
        )

    status, message = code(lambda: first_of(watch(cursor="not-a-cursor")))
    assert (
        status == grpc.StatusCode.INVALID_ARGUMENT and "cursor" in message and "garbled" in message
    )
    foreign = TokenSigner(b"k" * 32, "00000000-0000-4000-8000-000000000000").seal(
        "cursor", {"revision": 1, "id": 1}
    )
    status, message = code(lambda: first_of(watch(cursor=foreign)))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "another deployment" in message
    page_token_as_cursor = rpcs.ListProjects(
        project_service_pb2.ListProjectsRequest(page_size=2), metadata=METADATA
    ).next_page_token
    status, message = code(lambda: first_of(watch(cursor=page_token_as_cursor)))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "is not a cursor" in message
    real = first_of(watch(from_beginning=True)).cursor
    status, message = code(lambda: first_of(watch(cursor=real, from_beginning=True)))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "not both" in message

    # Two open streams per client here; the third is refused, another client's is not.
    open_streams = [watch(from_beginning=True) for _ in range(2)]
    for stream in open_streams:
        first_of(stream)
    status, message = code(lambda: first_of(watch(from_beginning=True)))
    assert (
        status == grpc.StatusCode.RESOURCE_EXHAUSTED and "WATCH_MAX_STREAMS_PER_CLIENT" in message
    )
    for stream in open_streams:
        stream.cancel()
    _wait_for(lambda: _opens(watch))


def _opens(watch: Callable[..., Any]) -> bool:
    """Whether a new stream opens now (False while the cap still counts closed ones)."""
    try:
        first_of(watch(from_beginning=True))
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
    return True


def test_changes_updates_and_a_watcher_that_lags_behind_the_feed(
    sqlite_stack: Callable[..., Stack],
) -> None:
    # A buffer of 5 changes: a stream that does not read is dropped from the feed and served
    # from the database at its own pace, missing nothing.
    stack = sqlite_stack()
    gateway = stack.start_gateway(WATCH_BUFFER_CHANGES="5")
    stack.start_worker()
    lagging = gateway.projects.WatchProjects(
        project_service_pb2.WatchProjectsRequest(from_beginning=True), metadata=METADATA, timeout=60
    )
    changes = each_change(lagging)
    for page in (1, 2, 3):
        wait_for_task(gateway, upload(gateway, page).id)
    seen = [next(changes) for _ in range(3 * PER_PAGE)]
    assert len({change.project.url for change in seen}) == 3 * PER_PAGE
    # A page's 10 changes overflow a buffer of 5: the stream went back to the database.
    assert "a watch stream fell behind" in gateway.process.output()
    # Page 1 again, unchanged: no change. Page 1 changed (one title): one UPDATED.
    wait_for_task(gateway, upload(gateway, 1).id)
    projects = sample_page(1)
    projects[0] = dataclasses.replace(projects[0], title="A new title")
    stack.site.set_page(1, render_listing(projects), "text/html; charset=utf-8")
    wait_for_task(gateway, upload(gateway, 1).id)
    update = next(changes)
    assert update.change_type == ChangeType.CHANGE_TYPE_UPDATED
    assert update.project.title == "A new title"
    lagging.cancel()  # type: ignore[no-untyped-call]


def test_sigterm_ends_open_streams_unavailable_with_the_way_to_resume(
    sqlite_stack: Callable[..., Stack],
) -> None:
    stack = sqlite_stack()
    gateway = stack.start_gateway()

    store_one(stack, 1)
    stream = gateway.projects.WatchProjects(
        project_service_pb2.WatchProjectsRequest(from_beginning=True), metadata=METADATA, timeout=60
    )
    changes = each_change(stream)
    next(changes)  # the stream is open at the gateway, and now idle
    started = time.monotonic()
    gateway.process.send(signal.SIGTERM)
    with pytest.raises(grpc.RpcError) as caught:
        next(changes)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down; resume from your cursor" in (caught.value.details() or "")
    assert time.monotonic() - started < 5.0  # within GATEWAY_GRACE_SECONDS
    assert gateway.process.popen.wait(30) == 0


@pytest.mark.parametrize(("keepalive", "survives"), [("0.5", True), ("60", False)])
def test_an_idle_watch_stream_survives_a_proxy_that_cuts_quiet_connections(
    sqlite_stack: Callable[..., Stack], keepalive: str, survives: bool
) -> None:
    # The proxy closes a connection that carried nothing for 2 s. The gateway's pings
    # (GATEWAY_KEEPALIVE_SECONDS) keep an idle stream's connection busy enough; without them
    # (60 s) the same stream is cut, which shows what the pings do.
    stack = sqlite_stack()
    gateway = stack.start_gateway(
        GATEWAY_KEEPALIVE_SECONDS=keepalive, WATCH_POLL_INTERVAL_SECONDS="0.2"
    )
    host, port = gateway.address.rsplit(":", 1)
    idle_limit = 2.0

    store_one(stack, 1)
    with (
        IdleCuttingProxy((host, int(port)), idle_limit) as proxy,
        grpc.insecure_channel(proxy.address) as channel,
    ):
        stream = project_service_pb2_grpc.ProjectServiceStub(channel).WatchProjects(
            project_service_pb2.WatchProjectsRequest(from_beginning=True),
            metadata=METADATA,
            timeout=30,
        )
        changes = each_change(stream)
        assert next(changes).project.url == project_item(1).url  # open, caught up, now idle
        # Quiet for three of the proxy's idle limits (or until the proxy cut it).
        quiet_until = time.monotonic() + 3 * idle_limit
        while time.monotonic() < quiet_until and not proxy.cuts:
            time.sleep(0.1)
        store_one(stack, 7)
        if survives:
            change = next(changes)
            assert change.project.url == project_item(7).url
            assert (proxy.connections, proxy.cuts) == (1, 0)
        else:
            with pytest.raises(grpc.RpcError) as caught:
                next(changes)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert proxy.cuts == 1
        stream.cancel()  # type: ignore[no-untyped-call]


def test_a_stream_from_now_says_where_now_is_and_resumes_from_there(
    sqlite_stack: Callable[..., Stack],
) -> None:
    stack = sqlite_stack()
    gateway = stack.start_gateway(WATCH_POLL_INTERVAL_SECONDS="0.2")
    store_one(stack, 1)  # before the stream: not part of it

    stream = gateway.projects.WatchProjects(
        project_service_pb2.WatchProjectsRequest(), metadata=METADATA, timeout=30
    )
    first = next(iter(stream))
    stream.cancel()  # type: ignore[no-untyped-call]
    assert list(first.changes) == [] and first.cursor
    # Cut before any change came: what is committed meanwhile is there on resuming.
    store_one(stack, 2)
    resumed = gateway.projects.WatchProjects(
        project_service_pb2.WatchProjectsRequest(cursor=first.cursor), metadata=METADATA, timeout=30
    )
    assert [change.project.url for change in next(iter(resumed)).changes] == [project_item(2).url]
    resumed.cancel()  # type: ignore[no-untyped-call]


def store_one(stack: Stack, number: int) -> None:
    """Store project `number` as a worker would (no event: the gateway's poll finds it)."""

    async def one_project() -> None:
        engine = create_engine(stack.database_url)
        try:
            await store_projects(engine, [project_item(number)], 10)
        finally:
            await engine.dispose()

    run(one_project())

"""gateway.project_service without a server: the request checks, the stream cap per client,
and page tokens, which continue only the listing they were made for.

ListProjects runs here for real, on a fake store (an in-memory keyset over a few rows) and a
real TokenSigner; a fake context turns the handler's abort into an exception to look at.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway.errors import InvalidArgument, ResourceExhausted
from gateway.messages import project_message
from gateway.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from gateway.paging import page_size as _page_size
from gateway.project_service import (
    CURSOR_KIND,
    MAX_QUERY_LENGTH,
    PAGE_TOKEN_KIND,
    ChangeType,
    ProjectService,
    StreamSlots,
    _described_filters,
    _filters,
    _order,
)
from gateway.project_store import (
    BEGINNING,
    DEFAULT_ORDER,
    ORDERS,
    Filters,
    Order,
    Position,
    StoredProject,
)
from gateway.tokens import TokenSigner
from gateway.watching import Delivery
from projects.v1 import project_service_pb2

ListRequest = project_service_pb2.ListProjectsRequest
T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
NO_DATE = dt.date(1, 1, 1)


def field_of(error: InvalidArgument) -> str:
    detail = error.details[0]
    assert isinstance(detail, error_details_pb2.BadRequest)
    return str(detail.field_violations[0].field)


# --- page_size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "size"),
    [
        (0, DEFAULT_PAGE_SIZE),
        (1, 1),
        (50, 50),
        (MAX_PAGE_SIZE, MAX_PAGE_SIZE),
        (MAX_PAGE_SIZE + 1, MAX_PAGE_SIZE),
        (2**31 - 1, MAX_PAGE_SIZE),
    ],
)
def test_page_size_zero_is_the_default_and_a_large_one_is_capped(requested: int, size: int) -> None:
    assert DEFAULT_PAGE_SIZE == 50 and MAX_PAGE_SIZE == 1000
    assert _page_size(requested) == size


@pytest.mark.parametrize("requested", [-1, -50, -(2**31)])
def test_a_negative_page_size_is_invalid(requested: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _page_size(requested)

    assert field_of(caught.value) == "page_size"
    assert caught.value.message == f"page_size: must not be negative; got {requested}"


# --- order_by ---------------------------------------------------------------------------------


def test_an_empty_order_is_the_default() -> None:
    assert _order("") == (DEFAULT_ORDER, ORDERS[DEFAULT_ORDER])
    assert _order("   ") == (DEFAULT_ORDER, ORDERS[DEFAULT_ORDER])
    assert DEFAULT_ORDER == "update_time desc"


@pytest.mark.parametrize(
    ("requested", "name"),
    [
        ("update_time desc", "update_time desc"),
        ("UPDATE_TIME DESC", "update_time desc"),
        ("  create_time   desc ", "create_time desc"),
        ("Start_Date\tDesc", "start_date desc"),
        ("URL", "url"),
        (" url\n", "url"),
    ],
)
def test_the_order_is_read_with_whitespace_and_case_normalised(requested: str, name: str) -> None:
    assert _order(requested) == (name, ORDERS[name])


@pytest.mark.parametrize(
    "requested", ["title", "url desc", "update_time", "updatetime desc", "update_time  asc"]
)
def test_an_unknown_order_lists_the_allowed_ones(requested: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _order(requested)

    assert field_of(caught.value) == "order_by"
    message = caught.value.message
    for allowed in ORDERS:
        assert repr(allowed) in message
    assert f"got {requested!r}" in message


# --- filters ----------------------------------------------------------------------------------


def test_no_filters_by_default() -> None:
    assert _filters(ListRequest()) == Filters(is_active=None, updated_after=None, query="")


def test_is_active_false_is_a_filter_and_unset_is_none() -> None:
    assert _filters(ListRequest(is_active=False)).is_active is False
    assert _filters(ListRequest(is_active=True)).is_active is True


def test_updated_after_is_read_as_utc() -> None:
    when = timestamp_pb2.Timestamp(seconds=int(T0.timestamp()), nanos=250_000_000)

    updated_after = _filters(ListRequest(updated_after=when)).updated_after

    assert updated_after == T0 + dt.timedelta(milliseconds=250)
    assert updated_after is not None and updated_after.tzinfo is dt.UTC


def test_a_query_up_to_the_limit_is_taken_and_a_longer_one_refused() -> None:
    longest = "é" * MAX_QUERY_LENGTH
    assert _filters(ListRequest(query=longest)).query == longest

    with pytest.raises(InvalidArgument) as caught:
        _filters(ListRequest(query="x" * (MAX_QUERY_LENGTH + 1)))

    assert field_of(caught.value) == "query"
    assert f"at most {MAX_QUERY_LENGTH} characters" in caught.value.message


# --- the stream cap per client ----------------------------------------------------------------


def test_a_client_holds_up_to_the_cap_and_no_more() -> None:
    slots = StreamSlots(2)

    with slots.hold("alice"), slots.hold("alice"):
        with pytest.raises(ResourceExhausted) as caught, slots.hold("alice"):
            pass
        assert "'alice' has 2 watch streams open" in caught.value.message
        assert "WATCH_MAX_STREAMS_PER_CLIENT" in caught.value.message
        retry = caught.value.details[0]
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert retry.retry_delay.seconds == 1
        # Another client is not counted against alice.
        with slots.hold("bob"), slots.hold("bob"):
            pass


def test_a_slot_is_freed_when_its_stream_ends_even_by_an_error() -> None:
    slots = StreamSlots(1)

    with slots.hold("alice"):
        pass
    with pytest.raises(RuntimeError), slots.hold("alice"):
        raise RuntimeError("the stream failed")
    with slots.hold("alice"), pytest.raises(ResourceExhausted), slots.hold("alice"):
        pass
    with slots.hold("alice"):  # the refused one took nothing
        pass
    assert slots._open == {}


def test_clients_at_their_cap_leave_others_unaffected() -> None:
    slots = StreamSlots(1)

    with slots.hold("alice"):
        with pytest.raises(ResourceExhausted):
            slots.hold("alice").__enter__()
        with slots.hold("bob"), slots.hold("carol"):
            assert slots._open == {"alice": 1, "bob": 1, "carol": 1}
        assert slots._open == {"alice": 1}


# --- ListProjects and its page tokens ---------------------------------------------------------


def project(n: int, updated_at: dt.datetime, start_date: dt.date | None) -> StoredProject:
    return StoredProject(
        id=n,
        url=f"https://listing.test/projects/{n:03d}",
        title=f"Project {n}",
        description="",
        is_active=n % 2 == 0,
        start_date=start_date,
        first_seen_at=T0 + dt.timedelta(minutes=n % 4),
        updated_at=updated_at,
        last_seen_at=updated_at,
        revision=n,
        start_sort=start_date or NO_DATE,
    )


# Equal sort keys on purpose: ids break the ties.
ROWS = [
    project(
        n, T0 + dt.timedelta(seconds=n // 3), None if n % 3 == 0 else dt.date(2026, 1, 1 + n % 4)
    )
    for n in range(1, 12)
]


@dataclass
class Page:
    order: Order
    filters: Filters
    after: Sequence[Any] | None
    limit: int


class FakeStore:
    """ProjectStore.page over ROWS in memory (filters recorded, not applied)."""

    def __init__(self) -> None:
        self.pages: list[Page] = []

    async def page(
        self, order: Order, filters: Filters, after: Sequence[Any] | None, limit: int
    ) -> list[StoredProject]:
        self.pages.append(Page(order, filters, after, limit))
        rows = sorted(ROWS, key=order.key, reverse=order.descending)
        if after is not None:
            mark = tuple(after)
            rows = [
                r
                for r in rows
                if (order.key(r) < mark if order.descending else order.key(r) > mark)
            ]
        return rows[:limit]


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, metadata: Any) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.metadata = metadata

    def bad_request(self) -> error_details_pb2.BadRequest:
        status = status_pb2.Status.FromString(dict(self.metadata)["grpc-status-details-bin"])
        found = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(found)
        return found


class FakeContext:
    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise Aborted(code, details, trailing_metadata)


SIGNER = TokenSigner(b"s" * 32, "deployment-under-test")


def service(store: FakeStore | None = None, signer: TokenSigner = SIGNER) -> ProjectService:
    return ProjectService(
        cast(Any, store or FakeStore()), cast(Any, None), signer, max_streams_per_client=1
    )


async def list_projects(
    projects: ProjectService, **fields: Any
) -> project_service_pb2.ListProjectsResponse:
    return await projects.ListProjects(ListRequest(**fields), cast(Any, FakeContext()))


async def refused(projects: ProjectService, **fields: Any) -> Aborted:
    with pytest.raises(Aborted) as caught:
        await list_projects(projects, **fields)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value


@pytest.mark.parametrize("order_by", list(ORDERS))
async def test_pages_continue_where_the_last_ended_in_every_order(order_by: str) -> None:
    store = FakeStore()
    projects = service(store)
    order = ORDERS[order_by]
    expected = [row.id for row in sorted(ROWS, key=order.key, reverse=order.descending)]

    seen: list[int] = []
    token = ""
    for _ in range(len(ROWS)):
        answer = await list_projects(projects, page_size=3, order_by=order_by, page_token=token)
        seen += [p.id for p in answer.projects]
        token = answer.next_page_token
        if not token:
            break

    assert seen == expected
    # One row more than the page is asked for, to know whether another page follows.
    assert {page.limit for page in store.pages} == {4}
    # The key comes back out of the token as the store's own types (datetime, date, str, int).
    assert len(store.pages) == 4  # 11 rows: 3, 3, 3 and 2
    for page, previous in zip(store.pages[1:], seen[2::3], strict=False):
        row = next(r for r in ROWS if r.id == previous)
        assert page.after is not None
        assert list(page.after) == list(order.key(row))
        assert [type(v) for v in page.after] == [type(v) for v in order.key(row)]


async def test_the_last_page_has_no_token() -> None:
    answer = await list_projects(service(), page_size=len(ROWS))

    assert len(answer.projects) == len(ROWS)
    assert answer.next_page_token == ""


async def test_a_token_continues_under_another_page_size_and_spelling_of_its_order() -> None:
    projects = service()
    first = await list_projects(projects, page_size=2, order_by="create_time desc")

    again = await list_projects(
        projects, page_size=5, order_by=" CREATE_TIME  Desc", page_token=first.next_page_token
    )

    assert len(again.projects) == 5


FIRST_UPDATED_AFTER = timestamp_pb2.Timestamp(seconds=int(T0.timestamp()) - 60)
OTHER_UPDATED_AFTER = timestamp_pb2.Timestamp(seconds=int(T0.timestamp()) - 59)


@pytest.mark.parametrize(
    ("made_with", "used_with", "field"),
    [
        ({}, {"order_by": "url"}, "order_by"),
        ({"order_by": "url"}, {}, "order_by"),
        ({"order_by": "start_date desc"}, {"order_by": "create_time desc"}, "order_by"),
        ({}, {"is_active": True}, "is_active"),
        ({"is_active": False}, {}, "is_active"),
        ({"is_active": False}, {"is_active": True}, "is_active"),
        ({}, {"updated_after": FIRST_UPDATED_AFTER}, "updated_after"),
        ({"updated_after": FIRST_UPDATED_AFTER}, {}, "updated_after"),
        (
            {"updated_after": FIRST_UPDATED_AFTER},
            {"updated_after": OTHER_UPDATED_AFTER},
            "updated_after",
        ),
        ({}, {"query": "solar"}, "query"),
        ({"query": "solar"}, {"query": "Solar"}, "query"),
    ],
)
async def test_a_token_is_refused_for_another_listing_naming_what_differs(
    made_with: dict[str, Any], used_with: dict[str, Any], field: str
) -> None:
    projects = service()
    first = await list_projects(projects, page_size=2, **made_with)
    assert first.next_page_token

    error = await refused(projects, page_size=2, page_token=first.next_page_token, **used_with)

    assert error.details.startswith(f"page_token: was made for {field} ")
    assert "send the same filters and order_by as the first page, or no token" in error.details
    violation = error.bad_request().field_violations[0]
    assert violation.field == "page_token"
    assert error.details == f"page_token: {violation.description}"


def test_open_page_token_names_what_the_token_was_made_for_and_what_was_sent() -> None:
    projects = service()
    made_for = _described_filters("url", Filters(is_active=True))
    token = SIGNER.seal(PAGE_TOKEN_KIND, {"request": made_for, "key": ["https://x.test/1"]})

    assert projects._open_page_token(token, "url", dict(made_for)) == ["https://x.test/1"]
    with pytest.raises(InvalidArgument) as caught:
        projects._open_page_token(token, "url", _described_filters("url", Filters(is_active=False)))
    assert caught.value.message.startswith("page_token: was made for is_active True, not False:")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("garbage", "is garbled"),
        (SIGNER.seal(CURSOR_KIND, {"revision": 1, "id": 2}), "is not a page"),
        (
            TokenSigner(b"s" * 32, "another-deployment").seal(PAGE_TOKEN_KIND, {}),
            "was made by another deployment (another-deployment), not this one "
            "(deployment-under-test)",
        ),
        (TokenSigner(b"x" * 32, "deployment-under-test").seal(PAGE_TOKEN_KIND, {}), "was altered"),
        # Signed, but not what this service puts in a page token.
        (SIGNER.seal(PAGE_TOKEN_KIND, {"key": [1]}), "is garbled"),
        (
            SIGNER.seal(
                PAGE_TOKEN_KIND,
                {"request": _described_filters(DEFAULT_ORDER, Filters()), "key": ["x", 1]},
            ),
            "is garbled",
        ),
        (
            SIGNER.seal(
                PAGE_TOKEN_KIND,
                {"request": _described_filters(DEFAULT_ORDER, Filters()), "key": [T0.isoformat()]},
            ),
            "is garbled",
        ),
    ],
    ids=[
        "not-a-token",
        "a-cursor",
        "other-deployment",
        "other-key",
        "no-request",
        "bad-key",
        "short-key",
    ],
)
async def test_an_unusable_page_token_is_invalid_with_its_reason(token: str, reason: str) -> None:
    error = await refused(service(), page_token=token)

    assert error.details.startswith("page_token: ")
    assert reason in error.details
    assert error.bad_request().field_violations[0].field == "page_token"


async def test_invalid_requests_are_answered_before_the_store_is_asked() -> None:
    store = FakeStore()
    projects = service(store)

    assert (await refused(projects, page_size=-1)).bad_request().field_violations[0].field == (
        "page_size"
    )
    assert "'url'" in (await refused(projects, order_by="title")).details
    await refused(projects, query="q" * (MAX_QUERY_LENGTH + 1))
    assert store.pages == []


# --- WatchProjects' responses -------------------------------------------------------------------


def opened_cursor(cursor: str) -> Position:
    payload = SIGNER.open(CURSOR_KIND, cursor)
    return Position(int(payload["revision"]), int(payload["id"]))


def test_streams_caught_up_with_a_delivery_share_one_response_per_filter() -> None:
    projects = service()
    delivery = Delivery(ROWS[:6])

    everything = projects._delivered(delivery, BEGINNING, None)
    active = projects._delivered(delivery, BEGINNING, True)

    assert everything is projects._delivered(delivery, BEGINNING, None)
    assert active is projects._delivered(delivery, Position(0, 0), True)
    assert everything is not None and active is not None
    assert [change.project.id for change in everything.changes] == [1, 2, 3, 4, 5, 6]
    assert [change.project.id for change in active.changes] == [2, 4, 6]
    # Both resume after the delivery's last row, whichever row each sent last.
    assert opened_cursor(everything.cursor) == opened_cursor(active.cursor) == delivery.last


def test_a_stream_that_read_part_of_a_delivery_gets_only_the_rest() -> None:
    projects = service()
    delivery = Delivery(ROWS[:6])
    shared = projects._delivered(delivery, BEGINNING, None)

    rest = projects._delivered(delivery, ROWS[3].position, None)

    assert rest is not None and rest is not shared
    assert [change.project.id for change in rest.changes] == [5, 6]
    assert opened_cursor(rest.cursor) == delivery.last


def test_a_delivery_with_nothing_for_the_filter_sends_nothing() -> None:
    projects = service()
    inactive_only = Delivery([row for row in ROWS if not row.is_active])

    assert projects._delivered(inactive_only, BEGINNING, True) is None
    assert projects._delivered(inactive_only, inactive_only.first, True) is None


def test_a_change_says_whether_its_project_is_new_and_carries_its_fields() -> None:
    created = ROWS[0]._replace(updated_at=ROWS[0].first_seen_at)
    changed = ROWS[1]._replace(updated_at=ROWS[1].first_seen_at + dt.timedelta(1))
    response = service()._delivered(Delivery([created, changed]), BEGINNING, None)

    assert response is not None
    first, second = response.changes
    assert first.change_type == ChangeType.CHANGE_TYPE_CREATED
    assert second.change_type == ChangeType.CHANGE_TYPE_UPDATED
    assert first.project == project_message(created)
    assert second.project.update_time.ToDatetime(dt.UTC) == changed.updated_at

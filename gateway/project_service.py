"""ProjectService handlers: page through the projects, get one, watch them change.

Requests are validated here, tokens and cursors sealed and opened by `gateway.tokens`, rows
read by `gateway.project_store`, changes fanned out by `gateway.watching`. Every client sees
every project; the auth interceptor has already named the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from gateway.auth import current_client
from gateway.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    answers_errors,
    answers_stream_errors,
)
from gateway.messages import project_fields, project_message
from gateway.paging import GARBLED, open_page_token, page_size, seal_page_token
from gateway.project_store import (
    BEGINNING,
    DEFAULT_ORDER,
    ORDERS,
    Filters,
    Order,
    Position,
    ProjectStore,
    StoredProject,
)
from gateway.tokens import TokenError, TokenSigner
from gateway.watching import READ_BATCH, Delivery, Overflowed, ProjectFeed, Subscription
from projects.v1 import project_pb2, project_service_pb2, project_service_pb2_grpc

log = logging.getLogger(__name__)

MAX_QUERY_LENGTH = 200
# The kinds of token this service seals (gateway.tokens).
PAGE_TOKEN_KIND = "page"  # noqa: S105 - a kind of token, not a secret
CURSOR_KIND = "cursor"
SHUTTING_DOWN = "the gateway is shutting down; resume from your cursor"
ChangeType = project_pb2.ChangeType

ListContext = grpc.aio.ServicerContext[
    project_service_pb2.ListProjectsRequest, project_service_pb2.ListProjectsResponse
]
GetContext = grpc.aio.ServicerContext[
    project_service_pb2.GetProjectRequest, project_service_pb2.GetProjectResponse
]
WatchContext = grpc.aio.ServicerContext[
    project_service_pb2.WatchProjectsRequest, project_service_pb2.WatchProjectsResponse
]


def _order(requested: str) -> tuple[str, Order]:
    name = " ".join(requested.split()).lower() or DEFAULT_ORDER
    if name not in ORDERS:
        allowed = ", ".join(repr(order) for order in ORDERS)
        raise InvalidArgument("order_by", f"must be one of {allowed}; got {requested!r}")
    return name, ORDERS[name]


def _filters(request: project_service_pb2.ListProjectsRequest) -> Filters:
    if len(request.query) > MAX_QUERY_LENGTH:
        raise InvalidArgument("query", f"must be at most {MAX_QUERY_LENGTH} characters")
    return Filters(
        is_active=request.is_active if request.HasField("is_active") else None,
        updated_after=request.updated_after.ToDatetime(dt.UTC)
        if request.HasField("updated_after")
        else None,
        query=request.query,
    )


def _key_text(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.date) else value


def _key_value(order_name: str, text: Any) -> Any:
    if order_name in ("update_time desc", "create_time desc"):
        return dt.datetime.fromisoformat(text)
    if order_name == "start_date desc":
        return dt.date.fromisoformat(text)
    return str(text)


def _described_filters(order_name: str, filters: Filters) -> dict[str, Any]:
    """What a page token remembers of the request that made it, to refuse it with another."""
    return {
        "order_by": order_name,
        "is_active": filters.is_active,
        "updated_after": None
        if filters.updated_after is None
        else _key_text(filters.updated_after),
        "query": filters.query,
    }


def _change(project: StoredProject) -> dict[str, Any]:
    return {
        "project": project_fields(project),
        "change_type": ChangeType.CHANGE_TYPE_CREATED
        if project.created
        else ChangeType.CHANGE_TYPE_UPDATED,
    }


class StreamSlots:
    """Open watch streams per client in this process, each client up to a cap."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        held = self._open.get(client, 0)
        if held >= self._cap:
            raise ResourceExhausted(
                f"client {client!r} has {held} watch streams open on this gateway, the most "
                "allowed (WATCH_MAX_STREAMS_PER_CLIENT); close one, or retry later",
                1.0,
            )
        self._open[client] = held + 1
        try:
            yield
        finally:
            self._open[client] -= 1
            if not self._open[client]:
                del self._open[client]


class ProjectService(project_service_pb2_grpc.ProjectServiceServicer):
    def __init__(
        self,
        store: ProjectStore,
        feed: ProjectFeed,
        signer: TokenSigner,
        *,
        max_streams_per_client: int,
    ) -> None:
        self._store = store
        self._feed = feed
        self._signer = signer
        self._slots = StreamSlots(max_streams_per_client)
        self._stopping = asyncio.Event()

    def stop_streams(self) -> None:
        """End every open watch stream with UNAVAILABLE and the way to resume."""
        self._stopping.set()

    @answers_errors
    async def ListProjects(
        self, request: project_service_pb2.ListProjectsRequest, context: ListContext
    ) -> project_service_pb2.ListProjectsResponse:
        size = page_size(request.page_size)
        order_name, order = _order(request.order_by)
        filters = _filters(request)
        described = _described_filters(order_name, filters)
        after = None
        if request.page_token:
            after = self._open_page_token(request.page_token, order_name, described)
        rows = await self._store.page(order, filters, after, size + 1)
        next_token = ""
        if len(rows) > size:
            rows = rows[:size]
            key = [_key_text(value) for value in order.key(rows[-1])]
            next_token = seal_page_token(self._signer, PAGE_TOKEN_KIND, described, key)
        return project_service_pb2.ListProjectsResponse(
            projects=[project_fields(row) for row in rows],  # type: ignore[misc]  # see project_fields
            next_page_token=next_token,
        )

    def _open_page_token(self, token: str, order_name: str, described: dict[str, Any]) -> list[Any]:
        key = open_page_token(self._signer, PAGE_TOKEN_KIND, token, described)
        try:
            order = ORDERS[order_name]
            mine = [order.column] if order.unique else [order.column, None]
            if len(key) != len(mine):
                raise ValueError(key)
            return [
                _key_value(order_name, value) if column is not None else int(value)
                for value, column in zip(key, mine, strict=True)
            ]
        except (ValueError, TypeError) as exc:
            raise InvalidArgument("page_token", GARBLED) from exc

    @answers_errors
    async def GetProject(
        self, request: project_service_pb2.GetProjectRequest, context: GetContext
    ) -> project_service_pb2.GetProjectResponse:
        which = request.WhichOneof("project")
        if which == "id":
            found = await self._store.by_id(request.id)
            named = f"id {request.id}"
        elif which == "url":
            found = await self._store.by_url(request.url)
            named = f"url {request.url!r}"
        else:
            raise InvalidArgument("project", "name the project by its id or by its url")
        if found is None:
            raise NotFound(f"no project with {named} has been harvested")
        return project_service_pb2.GetProjectResponse(project=project_message(found))

    async def _start(self, request: project_service_pb2.WatchProjectsRequest) -> Position:
        if request.cursor and request.from_beginning:
            raise InvalidArgument("cursor", "give a cursor or from_beginning, not both")
        if request.from_beginning:
            return BEGINNING
        if not request.cursor:
            return await self._store.head()
        try:
            payload = self._signer.open(CURSOR_KIND, request.cursor)
            return Position(int(payload["revision"]), int(payload["id"]))
        except TokenError as exc:
            raise InvalidArgument("cursor", str(exc)) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument("cursor", "is garbled: pass it back as given") from exc

    def _cursor(self, position: Position) -> str:
        return self._signer.seal(CURSOR_KIND, {"revision": position.revision, "id": position.id})

    def _response(
        self, rows: list[StoredProject], cursor_at: Position
    ) -> project_service_pb2.WatchProjectsResponse:
        """One response carrying `rows`, with the cursor that resumes after `cursor_at`."""
        return project_service_pb2.WatchProjectsResponse(
            changes=[_change(row) for row in rows],  # type: ignore[misc]  # dicts: see project_fields
            cursor=self._cursor(cursor_at),
        )

    async def _next(self, subscription: Subscription) -> list[Delivery]:
        """What the feed offers next, unless the gateway starts stopping first."""
        taking = asyncio.ensure_future(subscription.take())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((taking, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not taking.done():
                taking.cancel()
        if not taking.done() or taking.cancelled():
            raise Unavailable(SHUTTING_DOWN)
        return taking.result()

    def _delivered(
        self, delivery: Delivery, position: Position, is_active: bool | None
    ) -> project_service_pb2.WatchProjectsResponse | None:
        """The response for what `delivery` holds past `position` (None: nothing to send)."""
        if delivery.first > position:
            # A stream that was caught up: the response every such stream sends.
            return delivery.response(
                is_active, lambda rows: self._response(rows, delivery.last) if rows else None
            )
        rows = [row for row in delivery.rows_for(is_active) if row.position > position]
        return self._response(rows, delivery.last) if rows else None

    @answers_stream_errors
    async def WatchProjects(
        self, request: project_service_pb2.WatchProjectsRequest, context: WatchContext
    ) -> AsyncIterator[project_service_pb2.WatchProjectsResponse]:
        position = await self._start(request)
        is_active = request.is_active if request.HasField("is_active") else None
        with self._slots.hold(current_client.get()):
            if not request.cursor and not request.from_beginning:
                # "From now" is a place only the gateway knows: say where it is at once, so that
                # a stream cut before its first change resumes from there, missing nothing.
                yield project_service_pb2.WatchProjectsResponse(cursor=self._cursor(position))
            try:
                while True:
                    # Subscribed before reading the database: what is committed while it
                    # reads is offered by the feed, and what it reads twice is skipped.
                    async with self._feed.subscribe() as subscription:
                        try:
                            while True:
                                if self._stopping.is_set():
                                    raise Unavailable(SHUTTING_DOWN)
                                rows = await self._store.changes_after(
                                    position, is_active, READ_BATCH
                                )
                                if rows:
                                    position = rows[-1].position
                                    yield self._response(rows, position)
                                if len(rows) < READ_BATCH:
                                    break
                            while True:
                                for delivery in await self._next(subscription):
                                    if delivery.last <= position:
                                        continue
                                    response = self._delivered(delivery, position, is_active)
                                    position = delivery.last
                                    if response is not None:
                                        yield response
                        except Overflowed:
                            log.info("a watch stream fell behind; it reads the database again")
            except Unavailable as exc:
                if exc.message == SHUTTING_DOWN:
                    raise
                raise Unavailable(
                    f"{exc.message}; resume from your last cursor", cause=exc.cause
                ) from exc

"""QueueService handlers: request -> validate -> record -> publish -> answer.

Uploads without a request_id are recorded and published in groups by `gateway.issuing`; one
with a request_id claims its record first, so that repeats find it, then is published.

The caller's identity comes from `gateway.auth.current_client`; errors are raised as
`gateway.errors` types and turned into statuses by `answers_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format, timestamp_pb2

from core.db import MAX_REQUEST_ID_LENGTH, utcnow
from gateway.auth import current_client
from gateway.celery_queue import CeleryQueue, CeleryState, QueueUnavailable
from gateway.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Unavailable,
    answers_errors,
)
from gateway.health import DependencyHealth
from gateway.issuing import Issuer
from gateway.records import IssuedTask, StoreUnavailable, TaskRecords
from projects.v1 import queue_service_pb2, queue_service_pb2_grpc, task_pb2

log = logging.getLogger(__name__)

TaskStatus = task_pb2.TaskStatus
STATUS_BY_CELERY_STATE: dict[str, task_pb2.TaskStatus.ValueType] = {
    "PENDING": TaskStatus.TASK_STATUS_PENDING,
    "RECEIVED": TaskStatus.TASK_STATUS_PENDING,
    "STARTED": TaskStatus.TASK_STATUS_STARTED,
    "RETRY": TaskStatus.TASK_STATUS_RETRY,
    "SUCCESS": TaskStatus.TASK_STATUS_SUCCESS,
    "FAILURE": TaskStatus.TASK_STATUS_FAILURE,
    "REJECTED": TaskStatus.TASK_STATUS_FAILURE,
    "REVOKED": TaskStatus.TASK_STATUS_REVOKED,
}
_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_LENGTH}}}")
_EXAMPLE_ID = "123e4567-e89b-42d3-a456-426614174000"
PUBLICATION_POLL_SECONDS = 0.05
DEADLINE_MARGIN_SECONDS = 0.1
STORE_DOWN = "the task database is unreachable; retry shortly"
BROKER_DOWN = "the task broker is unreachable; nothing was enqueued; retry shortly"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


def _timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if value is None else timestamp(value)


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """`value` as a protobuf Timestamp, a naive datetime taken as UTC (as FromDatetime does)."""
    # Timestamp.FromDatetime goes through a time tuple and calendar.timegm, a tenth of an
    # Upload's own work in the gateway; the datetime's own arithmetic gives the same instant.
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    micros = (value - _EPOCH) // _MICROSECOND
    seconds, micro = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micro * 1000)


def describe(task: IssuedTask, state: CeleryState | None) -> task_pb2.Task:
    """The Task message for a record and the backend's state of it (None: not asked yet)."""
    message = task_pb2.Task(
        id=task.id,
        page=task.page,
        status=TaskStatus.TASK_STATUS_PENDING,
        enqueue_time=_timestamp(task.enqueued_at),
        start_time=_timestamp(task.started_at),
    )
    if task.lost_reason is not None and (state is None or state.status == "PENDING"):
        message.status = TaskStatus.TASK_STATUS_FAILURE
        message.error = task.lost_reason
        return message
    if state is None:
        return message
    message.status = STATUS_BY_CELERY_STATE.get(state.status, TaskStatus.TASK_STATUS_STARTED)
    if state.finished_at is not None and state.status in ("SUCCESS", "FAILURE", "REVOKED"):
        message.finish_time.CopyFrom(timestamp(state.finished_at))
    if state.status == "SUCCESS" and isinstance(state.result, dict):
        json_format.ParseDict(state.result, message.result, ignore_unknown_fields=True)
    elif state.status in ("FAILURE", "RETRY", "REVOKED", "REJECTED") and state.result is not None:
        message.error = str(state.result) or type(state.result).__name__
    return message


def _check_page(page: int, max_page: int) -> None:
    if not 1 <= page <= max_page:
        raise InvalidArgument("page", f"must be from 1 to {max_page}; got {page}")


def _check_request_id(request_id: str) -> str | None:
    if not request_id:
        return None
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(
            "request_id",
            f"must be 1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters without spaces",
        )
    return request_id


def _check_task_id(task_id: str) -> str:
    try:
        canonical = str(uuid.UUID(task_id))
    except ValueError:
        canonical = None
    if canonical != task_id:
        raise InvalidArgument("id", f"must be a task id as Upload returns it, like {_EXAMPLE_ID}")
    return task_id


class QueueService(queue_service_pb2_grpc.QueueServiceServicer):
    def __init__(
        self,
        records: TaskRecords,
        queue: CeleryQueue,
        issuer: Issuer,
        health: DependencyHealth,
        *,
        max_page: int,
        lifetime_seconds: int,
        publish_timeout: float,
    ) -> None:
        self._records = records
        self._queue = queue
        self._issuer = issuer
        self._health = health
        self._max_page = max_page
        self._lifetime_seconds = lifetime_seconds
        self._publish_timeout = publish_timeout
        self._publishing: set[asyncio.Task[None]] = set()

    async def _state(self, task: IssuedTask) -> CeleryState:
        try:
            return await self._queue.state(task.id)
        except QueueUnavailable as exc:
            await self._health.mark_down()
            raise Unavailable("the task result store is unreachable; retry shortly") from exc

    @contextlib.asynccontextmanager
    async def _enqueue_errors(self) -> AsyncIterator[None]:
        """A failed enqueue as the caller's UNAVAILABLE; a broker failure also marks it down."""
        try:
            yield
        except StoreUnavailable as exc:
            raise Unavailable(STORE_DOWN) from exc
        except QueueUnavailable as exc:
            await self._health.mark_down()
            raise Unavailable(BROKER_DOWN) from exc

    async def _forget(self, task: IssuedTask) -> None:
        try:
            await self._records.forget(task.id)
        except StoreUnavailable:
            log.exception("could not drop the record of unpublished task %s", task.id)

    async def _publish_or_forget(self, task: IssuedTask, give_up: float) -> None:
        try:
            await self._queue.publish(task.id, task.page, give_up)
            if task.published_at is None:
                await self._records.mark_published(task.id)
        except StoreUnavailable:
            # Published, but not marked: a repeat of its request_id will publish it again
            # (same id, idempotent storage) once the record looks abandoned.
            log.warning("task %s was enqueued but its record could not say so", task.id)
        except BaseException as exc:
            if isinstance(exc, QueueUnavailable):
                log.warning("publish of task %s failed: %s", task.id, exc)
            # Kept, the record of a task that never reached the broker would read PENDING
            # forever and hold its request_id hostage.
            await self._forget(task)
            raise

    def _publish_done(self, publishing: asyncio.Task[None]) -> None:
        self._publishing.discard(publishing)
        if not publishing.cancelled():
            publishing.exception()  # retrieved here when the caller has gone away

    async def drain(self) -> None:
        """Wait for publishes whose callers have gone away."""
        await self._issuer.drain()
        if self._publishing:
            await asyncio.wait(set(self._publishing))

    @answers_errors
    async def Upload(
        self,
        request: queue_service_pb2.UploadRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.UploadRequest, queue_service_pb2.UploadResponse
        ],
    ) -> queue_service_pb2.UploadResponse:
        _check_page(request.page, self._max_page)
        request_id = _check_request_id(request.request_id)
        client = current_client.get()
        if request_id is None:
            task = IssuedTask.new(client, None, request.page)
            async with self._enqueue_errors():
                await self._issuer.issue(task, self._give_up(context.time_remaining()))
            return queue_service_pb2.UploadResponse(task=describe(task, None))
        try:
            task, created = await self._records.claim(client, request_id, request.page)
        except StoreUnavailable as exc:
            raise Unavailable(STORE_DOWN) from exc
        if not created:
            if task.page != request.page:
                raise AlreadyExists(
                    f"request_id {request_id!r} was already used for page {task.page} "
                    f"(task {task.id}); use a new request_id for page {request.page}"
                )
            if task.published_at is not None:
                return queue_service_pb2.UploadResponse(
                    task=describe(task, await self._state(task))
                )
            task = await self._await_publication(task, context.time_remaining())
            return queue_service_pb2.UploadResponse(task=describe(task, None))
        await self._publish(task, context.time_remaining())
        return queue_service_pb2.UploadResponse(task=describe(task, None))

    async def _await_publication(self, task: IssuedTask, deadline: float | None) -> IssuedTask:
        """The record of a repeated request_id once the broker has the task.

        Another call (here or on another gateway) is publishing it: wait for its outcome rather
        than hand out an id that may never run. A record older than the publish bound lost its
        publisher (a gateway that stopped mid-call): publish it here, under the same id.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (self._publish_timeout if deadline is None else deadline)
        while True:
            current = await self._records.get(task.client, task.id)
            if current is None:
                raise Unavailable(
                    "the first Upload with this request_id could not enqueue it; retry", 0.5
                )
            if current.published_at is not None:
                return current
            if utcnow() - current.enqueued_at > dt.timedelta(seconds=2 * self._publish_timeout):
                await self._publish(current, None if deadline is None else give_up - loop.time())
                return current
            if loop.time() > give_up:
                raise Unavailable("this request_id is still being enqueued; retry shortly", 0.5)
            await asyncio.sleep(PUBLICATION_POLL_SECONDS)

    def _give_up(self, deadline: float | None) -> float:
        """When (time.monotonic()) a publish for a caller with `deadline` left should give up.

        At the caller's deadline or PUBLISH_TIMEOUT_SECONDS from now, whichever comes first;
        time spent waiting for its turn counts.
        """
        if deadline is not None:
            # Ended a little early, the caller hears why (UNAVAILABLE) rather than only that
            # its deadline passed.
            deadline -= DEADLINE_MARGIN_SECONDS
        allowed = (
            self._publish_timeout if deadline is None else min(self._publish_timeout, deadline)
        )
        return time.monotonic() + max(allowed, 0.1)

    async def _publish(self, task: IssuedTask, deadline: float | None) -> None:
        """Publish the recorded `task`, whatever the caller does.

        `deadline` is the caller's time left, if it set one (see `_give_up`).
        """
        give_up = self._give_up(deadline)
        publishing = asyncio.create_task(self._publish_or_forget(task, give_up))
        self._publishing.add(publishing)
        publishing.add_done_callback(self._publish_done)
        async with self._enqueue_errors():
            # Shielded: a caller that gives up (deadline, cancel) must not cut a publish in
            # half. It runs to its end; the record stays if the task reached the broker (a
            # retry with the request_id finds it) and goes if it did not.
            await asyncio.shield(publishing)
        log.debug("client %s enqueued task %s for page %d", task.client, task.id, task.page)

    @answers_errors
    async def GetStatus(
        self,
        request: queue_service_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.GetStatusRequest, queue_service_pb2.GetStatusResponse
        ],
    ) -> queue_service_pb2.GetStatusResponse:
        task_id = _check_task_id(request.id)
        try:
            task = await self._records.get(current_client.get(), task_id)
        except StoreUnavailable as exc:
            raise Unavailable(STORE_DOWN) from exc
        if task is None:
            raise NotFound(
                f"no task {task_id} was issued to you, or its record expired "
                f"(records are kept {self._lifetime_seconds} s); Upload the page again"
            )
        return queue_service_pb2.GetStatusResponse(task=describe(task, await self._state(task)))

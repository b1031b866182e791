"""QueueService handlers: request -> validate -> record -> publish -> answer.

Every Upload is issued by `gateway.issuing`, which records and publishes the tasks that arrive
together as one group. One with a request_id claims its record first, so that repeats find it:
a repeat answers with the task the first call created, once the broker has it.

The caller's identity comes from `gateway.auth.current_client`; errors are raised as
`gateway.errors` types (the records and the queue raise theirs) and turned into statuses by
`answers_errors`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time

import grpc
from google.protobuf import json_format

from core.db import MAX_REQUEST_ID_LENGTH, utcnow
from gateway.auth import current_client
from gateway.celery_queue import CeleryQueue, CeleryState
from gateway.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Unavailable,
    answers_errors,
)
from gateway.issuing import Issuer
from gateway.messages import optional_timestamp, timestamp
from gateway.records import IssuedTask, TaskRecords
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
# The 8-4-4-4-12 form only, ASCII hex digits only (uuid.UUID would also take other spellings).
_TASK_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
PUBLICATION_POLL_SECONDS = 0.05
DEADLINE_MARGIN_SECONDS = 0.1


def describe(task: IssuedTask, state: CeleryState | None) -> task_pb2.Task:
    """The Task message for a record and the backend's state of it (None: not asked yet)."""
    message = task_pb2.Task(
        id=task.id,
        page=task.page,
        status=TaskStatus.TASK_STATUS_PENDING,
        enqueue_time=optional_timestamp(task.enqueued_at),
        start_time=optional_timestamp(task.started_at),
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
    if page == 0:
        raise InvalidArgument("page", f"is required: a listing page from 1 to {max_page}")
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
    """The id in its canonical form (lowercase, as Upload returns it); any case is accepted."""
    if not _TASK_ID.fullmatch(task_id):
        raise InvalidArgument("id", f"must be a task id as Upload returns it, like {_EXAMPLE_ID}")
    return task_id.lower()


class QueueService(queue_service_pb2_grpc.QueueServiceServicer):
    def __init__(
        self,
        records: TaskRecords,
        queue: CeleryQueue,
        issuer: Issuer,
        *,
        max_page: int,
        lifetime_seconds: int,
        publish_timeout: float,
    ) -> None:
        self._records = records
        self._queue = queue
        self._issuer = issuer
        self._max_page = max_page
        self._lifetime_seconds = lifetime_seconds
        self._publish_timeout = publish_timeout

    async def drain(self) -> None:
        """Wait for publishes whose callers have gone away."""
        await self._issuer.drain()

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
        deadline = context.time_remaining()
        if request_id is None:
            task = IssuedTask.new(client, None, request.page)
            await self._issuer.issue(task, self._give_up(deadline))
            return queue_service_pb2.UploadResponse(task=describe(task, None))
        task, created = await self._records.claim(client, request_id, request.page)
        if created:
            await self._issuer.issue(task, self._give_up(deadline), claimed=True)
            return queue_service_pb2.UploadResponse(task=describe(task, None))
        if task.page != request.page:
            raise AlreadyExists(
                f"request_id {request_id!r} was already used for page {task.page} "
                f"(task {task.id}); use a new request_id for page {request.page}"
            )
        if task.published_at is None:
            task = await self._await_publication(task, deadline)
            return queue_service_pb2.UploadResponse(task=describe(task, None))
        state = await self._queue.state(task.id)
        return queue_service_pb2.UploadResponse(task=describe(task, state))

    async def _await_publication(self, task: IssuedTask, deadline: float | None) -> IssuedTask:
        """The record of a repeated request_id once the broker has the task.

        Another call (here or on another gateway) is publishing it: wait for its outcome rather
        than hand out an id that may never run. A record older than the publish bound lost its
        publisher (a gateway that stopped mid-call): issue it here, under the same id.
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
                left = None if deadline is None else give_up - loop.time()
                await self._issuer.issue(current, self._give_up(left), claimed=True)
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

    @answers_errors
    async def GetStatus(
        self,
        request: queue_service_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.GetStatusRequest, queue_service_pb2.GetStatusResponse
        ],
    ) -> queue_service_pb2.GetStatusResponse:
        task_id = _check_task_id(request.id)
        task = await self._records.get(current_client.get(), task_id)
        if task is None:
            raise NotFound(
                f"no task {task_id} was issued to you, or its record expired "
                f"(records are kept {self._lifetime_seconds} s); Upload the page again"
            )
        state = await self._queue.state(task.id)
        return queue_service_pb2.GetStatusResponse(task=describe(task, state))

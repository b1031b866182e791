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
import contextlib
import datetime as dt
import logging
import re
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from core.db import MAX_REQUEST_ID_LENGTH, utcnow
from core.events import EventPublisher, TaskChanged
from gateway.auth import current_client
from gateway.batches import BatchRecords, StoredBatch
from gateway.celery_queue import CeleryQueue, CeleryState
from gateway.errors import (
    BROKER_DOWN,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QueueUnavailable,
    StoreUnavailable,
    Unavailable,
    answers_errors,
    answers_stream_errors,
)
from gateway.issuing import VERDICT_MARGIN_SECONDS, Issuer
from gateway.messages import batch_message, optional_timestamp, timestamp
from gateway.paging import GARBLED, open_page_token, page_size, seal_page_token
from gateway.records import IssuedTask, TaskRecords
from gateway.tokens import TokenSigner
from gateway.watching import EventHub
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
TASKS_TOKEN_KIND = "tasks"  # noqa: S105 - a kind of token, not a secret
CELERY_STATE_BY_STATUS = {
    TaskStatus.TASK_STATUS_PENDING: "PENDING",
    TaskStatus.TASK_STATUS_STARTED: "STARTED",
    TaskStatus.TASK_STATUS_RETRY: "RETRY",
    TaskStatus.TASK_STATUS_SUCCESS: "SUCCESS",
    TaskStatus.TASK_STATUS_FAILURE: "FAILURE",
    TaskStatus.TASK_STATUS_REVOKED: "REVOKED",
}
FINAL_STATUSES = frozenset(
    {TaskStatus.TASK_STATUS_SUCCESS, TaskStatus.TASK_STATUS_FAILURE, TaskStatus.TASK_STATUS_REVOKED}
)
DEADLINE_MARGIN_SECONDS = 0.1
# Backend states a task's record says better once the worker has recorded a start or a retry.
_IN_FLIGHT = frozenset({"RECEIVED", "STARTED", "RETRY"})


def describe(task: IssuedTask, state: CeleryState | None) -> task_pb2.Task:
    """The Task message for a record and the backend's state of it (None: not asked).

    A final state in the record (the worker's, or the gateway's cancel or lost verdict) wins;
    before it, the worker's record of its start or retry (written before the backend's, and
    the one a TaskChanged event follows), else the backend's state.
    """
    message = task_pb2.Task(
        id=task.id,
        page=task.page,
        status=TaskStatus.TASK_STATUS_PENDING,
        enqueue_time=optional_timestamp(task.enqueued_at),
        start_time=optional_timestamp(task.started_at),
        batch_id=task.batch_id or "",
    )
    if task.finished_at is not None:
        message.status = STATUS_BY_CELERY_STATE[task.status]
        message.finish_time.CopyFrom(timestamp(task.finished_at))
        if task.status == "SUCCESS":
            message.result.CopyFrom(
                task_pb2.UploadResult(
                    page=task.page,
                    found=task.found or 0,
                    created=task.created or 0,
                    updated=task.updated or 0,
                    skipped=task.skipped or 0,
                    not_modified=bool(task.not_modified),
                )
            )
        else:
            message.error = task.error or task.status.lower()
        return message
    recorded = task.status in ("STARTED", "RETRY")
    if state is None or state.status == "PENDING" or (recorded and state.status in _IN_FLIGHT):
        # What the worker recorded of its start or its retries (the backend may lag behind).
        message.status = STATUS_BY_CELERY_STATE.get(task.status, TaskStatus.TASK_STATUS_PENDING)
        if task.status == "RETRY" and task.error:
            message.error = task.error
        return message
    # An ending the record does not have (a task that failed outside the worker's own code).
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


def _check_batch_id(batch_id: str, field: str = "id") -> str:
    """`_check_task_id` for a batch id in the request's `field`."""
    if not _TASK_ID.fullmatch(batch_id):
        raise InvalidArgument(
            field, f"must be a batch id as UploadPages returns it, like {_EXAMPLE_ID}"
        )
    return batch_id.lower()


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_pages: int  # MAX_BATCH_PAGES
    window: int  # UNTIL_KNOWN_WINDOW


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
        batches: BatchRecords,
        batch_limits: BatchLimits,
        hub: EventHub,
        events: EventPublisher,
        signer: TokenSigner,
        poll_interval: float,
    ) -> None:
        self._records = records
        self._queue = queue
        self._issuer = issuer
        self._max_page = max_page
        self._lifetime_seconds = lifetime_seconds
        self._publish_timeout = publish_timeout
        self._batches = batches
        self._batch_limits = batch_limits
        self._hub = hub
        self._events = events
        self._signer = signer
        self._poll_interval = poll_interval
        self._stopping = asyncio.Event()

    def stop_streams(self) -> None:
        """End every open watch stream with UNAVAILABLE."""
        self._stopping.set()

    async def drain(self) -> None:
        """Wait for publishes whose callers have gone away; then close the event publisher."""
        await self._issuer.drain()
        await self._events.close()

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
        task, created = await self._issuer.claim(
            client, request_id, request.page, lambda: self._give_up(deadline)
        )
        if created:
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
                # Its first publish may have gone out: a failure now keeps the record.
                await self._issuer.issue(
                    current, self._give_up(left), claimed=True, droppable=False
                )
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
        # The caller hears the verdict a moment after the publish gives up (Issuer.issue), and
        # that moment too is within the bound.
        return time.monotonic() + max(allowed - VERDICT_MARGIN_SECONDS, 0.1)

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

    # --- batches ------------------------------------------------------------------------------

    @answers_errors
    async def UploadPages(
        self,
        request: queue_service_pb2.UploadPagesRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.UploadPagesRequest, queue_service_pb2.UploadPagesResponse
        ],
    ) -> queue_service_pb2.UploadPagesResponse:
        first, last = request.first_page, request.last_page
        _check_page_field("first_page", first, self._max_page)
        _check_page_field("last_page", last, self._max_page)
        if last < first:
            raise InvalidArgument(
                "last_page", f"must not be below first_page ({first}); got {last}"
            )
        most = self._batch_limits.max_pages
        if last - first + 1 > most:
            raise InvalidArgument(
                "last_page",
                f"a batch is at most {most} pages (MAX_BATCH_PAGES): from {first}, at most "
                f"{first + most - 1}; got {last}",
            )
        request_id = _check_request_id(request.request_id)
        client = current_client.get()
        claimed = await self._batches.create(
            client,
            request_id,
            first,
            last,
            until_known=request.until_known,
            window=self._batch_limits.window,
        )
        batch = claimed.batch
        if not claimed.created:
            asked = (first, last, request.until_known)
            if (batch.first_page, batch.last_page, batch.until_known) != asked:
                raise AlreadyExists(
                    f"request_id {request_id!r} was already used for batch {batch.id} (pages "
                    f"{batch.first_page}-{batch.last_page}, until_known {batch.until_known}); "
                    "use a new request_id for other pages"
                )
            return queue_service_pb2.UploadPagesResponse(batch=batch_message(batch))
        give_up = self._give_up(context.time_remaining())
        pages = [
            IssuedTask(page.id, client, None, page.page, batch.enqueued_at, batch_id=batch.id)
            for page in claimed.pages
        ]
        outcomes = await asyncio.gather(
            *(self._issuer.issue(page, give_up, claimed=True) for page in pages),
            return_exceptions=True,
        )
        failed = [
            (page, error) for page, error in zip(pages, outcomes, strict=True) if error is not None
        ]
        for _, error in failed:
            if not isinstance(error, Exception):
                raise error  # cancelled: the loop is closing
        if failed and len(failed) == len(pages):
            await self._batches.drop(batch.id)
            error = failed[0][1]
            raise error if isinstance(error, Unavailable) else Unavailable(BROKER_DOWN)
        if failed:
            await self._batches.fail_unpublished(
                batch.id, [page.page for page, _ in failed], str(failed[0][1])
            )
        current = await self._batches.get(client, batch.id)
        return queue_service_pb2.UploadPagesResponse(batch=batch_message(current or batch))

    async def _batch(self, batch_id: str) -> StoredBatch:
        batch = await self._batches.get(current_client.get(), _check_batch_id(batch_id))
        if batch is None:
            raise NotFound(
                f"no batch {batch_id} was made for you, or its record expired "
                f"(records are kept {self._lifetime_seconds} s)"
            )
        return batch

    @answers_errors
    async def GetBatch(
        self,
        request: queue_service_pb2.GetBatchRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.GetBatchRequest, queue_service_pb2.GetBatchResponse
        ],
    ) -> queue_service_pb2.GetBatchResponse:
        return queue_service_pb2.GetBatchResponse(
            batch=batch_message(await self._batch(request.id))
        )

    # --- cancelling ---------------------------------------------------------------------------

    @answers_errors
    async def CancelTask(
        self,
        request: queue_service_pb2.CancelTaskRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.CancelTaskRequest, queue_service_pb2.CancelTaskResponse
        ],
    ) -> queue_service_pb2.CancelTaskResponse:
        task_id = _check_task_id(request.id)
        task = await self._records.cancel(current_client.get(), task_id)
        if task is None:
            raise NotFound(f"no task {task_id} was issued to you, or its record expired")
        if task.finished_at is not None and task.status != "REVOKED":
            raise FailedPrecondition(f"task {task_id} has finished: {task.status}")
        event = self._events.publish(TaskChanged(task_id, task.batch_id))
        if task.finished_at is not None:
            # Ended REVOKED: its queued message, if any, may be dropped by the workers.
            await asyncio.gather(self._queue.revoke([task_id]), event)
            return queue_service_pb2.CancelTaskResponse(task=describe(task, None))
        # Started: no revoke. Its message may be queued again (a retry, a redelivery), and a
        # worker that dropped it would leave the record STARTED for good; the worker's
        # checkpoint ends it REVOKED. The event and the state's read go together: each is
        # bounded, so a broker that hangs costs the call one bound, not two in a row.
        _, state = await asyncio.gather(event, self._queue.state(task_id))
        return queue_service_pb2.CancelTaskResponse(task=describe(task, state))

    @answers_errors
    async def CancelBatch(
        self,
        request: queue_service_pb2.CancelBatchRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.CancelBatchRequest, queue_service_pb2.CancelBatchResponse
        ],
    ) -> queue_service_pb2.CancelBatchResponse:
        batch_id = _check_batch_id(request.id)
        batch, pages = await self._batches.cancel(current_client.get(), batch_id)
        if batch is None:
            raise NotFound(f"no batch {batch_id} was made for you, or its record expired")
        if batch.status != "REVOKED":
            raise FailedPrecondition(f"batch {batch_id} has finished: {batch.status}")
        # One round trip for every page's event, beside the revoke: a Redis that hangs would
        # hold the call a bound per page otherwise.
        events = [TaskChanged(page, batch_id) for page in pages] or [TaskChanged("", batch_id)]
        await asyncio.gather(self._queue.revoke(pages), self._events.publish_all(events))
        return queue_service_pb2.CancelBatchResponse(batch=batch_message(batch))

    # --- listing ------------------------------------------------------------------------------

    @answers_errors
    async def ListTasks(
        self,
        request: queue_service_pb2.ListTasksRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.ListTasksRequest, queue_service_pb2.ListTasksResponse
        ],
    ) -> queue_service_pb2.ListTasksResponse:
        size = page_size(request.page_size)
        status = None
        if request.HasField("status"):
            status = CELERY_STATE_BY_STATUS.get(request.status)
            if status is None:
                raise InvalidArgument("status", f"is not a task status: {request.status}")
        batch_id = _check_batch_id(request.batch_id, "batch_id") if request.batch_id else None
        described = {"status": status, "batch_id": batch_id}
        after = None
        if request.page_token:
            after = self._open_tasks_token(request.page_token, described)
        client = current_client.get()
        tasks = await self._records.page(client, status, batch_id, after, size + 1)
        token = ""
        if len(tasks) > size:
            tasks = tasks[:size]
            key = [tasks[-1].enqueued_at.isoformat(), tasks[-1].id]
            token = seal_page_token(self._signer, TASKS_TOKEN_KIND, described, key)
        return queue_service_pb2.ListTasksResponse(
            tasks=[describe(task, None) for task in tasks], next_page_token=token
        )

    def _open_tasks_token(self, token: str, described: dict[str, Any]) -> tuple[dt.datetime, str]:
        key = open_page_token(self._signer, TASKS_TOKEN_KIND, token, described)
        try:
            when, task_id = key
            return dt.datetime.fromisoformat(when), str(task_id)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("page_token", GARBLED) from exc

    # --- watching -----------------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _resumable() -> Iterator[None]:
        """A dependency that fails (or hangs past its bound) under a stream ends it UNAVAILABLE,
        saying how to go on: a watch holds no position, so watching again resumes it."""
        try:
            yield
        except (StoreUnavailable, QueueUnavailable) as exc:
            raise Unavailable(f"{exc.message}; watch again to resume", cause=exc.cause) from exc

    async def _woken(self, woken: asyncio.Event) -> None:
        """Until an event wakes the stream or its slow timer fires; UNAVAILABLE on shutdown."""
        waiting = asyncio.ensure_future(woken.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait(
                (waiting, stopping), timeout=self._poll_interval, return_when=FIRST_COMPLETED
            )
        finally:
            waiting.cancel()
            stopping.cancel()
        if self._stopping.is_set():
            raise Unavailable("the gateway is shutting down; watch again to resume")

    @answers_stream_errors
    async def WatchStatus(
        self,
        request: queue_service_pb2.WatchStatusRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.WatchStatusRequest, queue_service_pb2.WatchStatusResponse
        ],
    ) -> AsyncIterator[queue_service_pb2.WatchStatusResponse]:
        task_id = _check_task_id(request.id)
        client = current_client.get()
        last: task_pb2.Task | None = None
        at: tuple[int, int, int] | None = None  # how far the record last seen had come
        with self._hub.watch(task_id) as watched, self._resumable():
            while True:
                carried = watched.take()
                task = None if at is None else _newer(carried, client, at)
                if task is None:
                    # The first look, a wake-up by the timer or by an event that carried no
                    # record, or only records no newer than the last sent (events may come in
                    # another order than their commits): the database says.
                    task = await self._records.get(client, task_id)
                if task is None:
                    if last is None:
                        raise NotFound(f"no task {task_id} was issued to you, or it expired")
                    return
                at = task.progress
                message = describe(task, None)
                if task.finished_at is None and (last is None or message == last):
                    # The record has not moved: only the result backend can tell of an ending
                    # outside the worker's code. When it has moved (the worker's write that an
                    # event follows), the record is news enough; the backend is read next time.
                    message = describe(task, await self._queue.state(task_id))
                if message != last:
                    yield queue_service_pb2.WatchStatusResponse(task=message)
                    last = message
                if message.status in FINAL_STATUSES:
                    return
                await self._woken(watched.woken)

    @answers_stream_errors
    async def WatchBatch(
        self,
        request: queue_service_pb2.WatchBatchRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.WatchBatchRequest, queue_service_pb2.WatchBatchResponse
        ],
    ) -> AsyncIterator[queue_service_pb2.WatchBatchResponse]:
        batch_id = _check_batch_id(request.id)
        client = current_client.get()
        last: task_pb2.Batch | None = None
        at: tuple[int, ...] | None = None  # how far the record last seen had come
        with self._hub.watch(batch_id) as watched, self._resumable():
            while True:
                carried = watched.take()
                batch = None if at is None else _newer_batch(carried, client, at)
                if batch is None:
                    # As for WatchStatus: the first look, the timer, or no newer record.
                    batch = await self._batch(batch_id)
                at = batch.progress
                message = batch_message(batch)
                if message != last:
                    yield queue_service_pb2.WatchBatchResponse(batch=message)
                    last = message
                if message.HasField("finish_time"):
                    return
                await self._woken(watched.woken)


def _newer(
    records: list[Mapping[str, Any]], client: str, at: tuple[int, int, int]
) -> IssuedTask | None:
    """The furthest come of the records events carried, if it is further than `at`."""
    tasks = [IssuedTask.from_record(record) for record in records]
    newer = [task for task in tasks if task and task.client == client and task.progress > at]
    return max(newer, key=lambda task: task.progress, default=None)


def _newer_batch(
    records: list[Mapping[str, Any]], client: str, at: tuple[int, ...]
) -> StoredBatch | None:
    """The furthest come of the batch records events carried, if it is further than `at`."""
    batches = [StoredBatch.from_record(record) for record in records]
    newer = [batch for batch in batches if batch and batch.client == client and batch.progress > at]
    return max(newer, key=lambda batch: batch.progress, default=None)


def _check_page_field(field: str, page: int, max_page: int) -> None:
    if page == 0:
        raise InvalidArgument(field, f"is required: a listing page from 1 to {max_page}")
    if not 1 <= page <= max_page:
        raise InvalidArgument(field, f"must be from 1 to {max_page}; got {page}")

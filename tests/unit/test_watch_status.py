"""QueueService.WatchStatus with fakes: a stream whose source stops answering (the records'
call ends StoreUnavailable at its bound) ends UNAVAILABLE with a RetryInfo and says how to
resume, instead of hanging."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from core.events import TaskChanged, record_json
from gateway.auth import current_client
from gateway.batches import StoredBatch
from gateway.celery_queue import CeleryState
from gateway.errors import StoreUnavailable
from gateway.records import IssuedTask
from gateway.service import BatchLimits, QueueService
from gateway.tokens import TokenSigner
from gateway.watching import EventHub
from projects.v1 import queue_service_pb2, task_pb2

TASK_ID = "123e4567-e89b-42d3-a456-426614174000"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers


class Context:
    async def abort(self, code: grpc.StatusCode, details: str, trailers: Any = None) -> None:
        raise Aborted(code, details, trailers)


class HangingRecords:
    """The records of a database that answered once, then stopped (each call ends at its
    bound as StoreUnavailable, as `gateway.database` makes it)."""

    def __init__(self) -> None:
        self.calls = 0

    async def get(self, client: str, task_id: str) -> IssuedTask:
        self.calls += 1
        if self.calls > 1:
            raise StoreUnavailable("TimeoutError: no answer within 1 s")
        return IssuedTask(task_id, client, None, 1, dt.datetime(2026, 12, 1, tzinfo=dt.UTC))


class PendingQueue:
    async def state(self, task_id: str) -> CeleryState:
        return CeleryState("PENDING", None, None)


async def no_events() -> AsyncIterator[Any]:
    return
    yield


async def test_a_watch_whose_database_stops_answering_ends_unavailable_saying_watch_again() -> None:
    records = HangingRecords()
    service = QueueService(
        cast(Any, records),
        cast(Any, PendingQueue()),
        cast(Any, None),
        max_page=10,
        lifetime_seconds=60,
        publish_timeout=3.0,
        batches=cast(Any, None),
        batch_limits=BatchLimits(10, 2),
        hub=EventHub(no_events),
        events=cast(Any, None),
        signer=TokenSigner(b"k" * 32, "d"),
        poll_interval=0.01,  # its slow timer: the second read comes at once
    )
    current_client.set("alice")
    seen: list[Any] = []

    async def watch() -> None:
        request = queue_service_pb2.WatchStatusRequest(id=TASK_ID)
        async for message in service.WatchStatus(request, cast(Any, Context())):
            seen.append(message)

    with pytest.raises(Aborted) as caught:
        await watch()
    assert len(seen) == 1  # the first read's answer, then the stall
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details.endswith("watch again to resume")
    assert "database is unreachable" in caught.value.details
    trailers = dict(caught.value.trailers)
    assert "grpc-status-details-bin" in trailers  # the RetryInfo travels in the rich status


T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
PENDING = IssuedTask(TASK_ID, "alice", None, 1, T0)
STARTED = dataclasses.replace(PENDING, status="STARTED", started_at=T0)
SUCCEEDED = dataclasses.replace(
    STARTED, status="SUCCESS", finished_at=T0, found=1, created=1, updated=0, skipped=0
)


class RecordsInTurn:
    """The record as each read finds it, the last one for every later read."""

    def __init__(self, *states: IssuedTask) -> None:
        self._states = list(states)

    async def get(self, client: str, task_id: str) -> IssuedTask:
        return self._states.pop(0) if len(self._states) > 1 else self._states[0]


class BackendInTurn:
    """The result backend's state of the task at each read; counts its reads."""

    def __init__(self, *states: str) -> None:
        self._states = list(states)
        self.reads = 0

    async def state(self, task_id: str) -> CeleryState:
        self.reads += 1
        status = self._states.pop(0) if len(self._states) > 1 else self._states[0]
        return CeleryState(status, "died" if status == "FAILURE" else None, None)


async def watched(records: Any, backend: Any) -> list[Any]:
    service = QueueService(
        cast(Any, records),
        cast(Any, backend),
        cast(Any, None),
        max_page=10,
        lifetime_seconds=60,
        publish_timeout=3.0,
        batches=cast(Any, None),
        batch_limits=BatchLimits(10, 2),
        hub=EventHub(no_events),
        events=cast(Any, None),
        signer=TokenSigner(b"k" * 32, "d"),
        poll_interval=0.01,  # each read comes at once
    )
    current_client.set("alice")
    request = queue_service_pb2.WatchStatusRequest(id=TASK_ID)
    return [message.task async for message in service.WatchStatus(request, cast(Any, Context()))]


async def test_a_record_that_moved_is_sent_without_reading_the_result_backend() -> None:
    backend = BackendInTurn("PENDING")

    seen = await watched(RecordsInTurn(PENDING, STARTED, STARTED, STARTED, SUCCEEDED), backend)

    assert [task.status for task in seen] == [
        task_pb2.TASK_STATUS_PENDING,
        task_pb2.TASK_STATUS_STARTED,
        task_pb2.TASK_STATUS_SUCCESS,
    ]
    # The first read, and the two reads of a STARTED record that had not moved; not the read
    # that found it STARTED, nor the final one.
    assert backend.reads == 3


async def test_an_ending_outside_the_worker_s_code_still_comes_from_the_backend() -> None:
    backend = BackendInTurn("PENDING", "FAILURE")

    seen = await watched(RecordsInTurn(PENDING, STARTED), backend)

    assert [task.status for task in seen] == [
        task_pb2.TASK_STATUS_PENDING,
        task_pb2.TASK_STATUS_STARTED,
        task_pb2.TASK_STATUS_FAILURE,
    ]
    assert seen[-1].error == "died"


# --- the record an event carries -----------------------------------------------------------


def carried(task: IssuedTask) -> dict[str, Any]:
    """The record a worker's TaskChanged carries (core.events.record_json of its columns)."""
    return record_json({**dataclasses.asdict(task), "lost_reason": None, "request_id": None})


class CountingRecords(RecordsInTurn):
    """RecordsInTurn that counts its reads."""

    def __init__(self, *states: IssuedTask) -> None:
        super().__init__(*states)
        self.reads = 0

    async def get(self, client: str, task_id: str) -> IssuedTask:
        self.reads += 1
        return await super().get(client, task_id)


async def watched_with_events(
    records: CountingRecords, events: list[TaskChanged], backend: Any
) -> list[Any]:
    """A stream of TASK_ID whose hub is told `events` once the stream has its first answer."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def listen() -> AsyncIterator[Any]:
        while True:
            yield await queue.get()

    hub = EventHub(listen)
    service = QueueService(
        cast(Any, records),
        cast(Any, backend),
        cast(Any, None),
        max_page=10,
        lifetime_seconds=60,
        publish_timeout=3.0,
        batches=cast(Any, None),
        batch_limits=BatchLimits(10, 2),
        hub=hub,
        events=cast(Any, None),
        signer=TokenSigner(b"k" * 32, "d"),
        poll_interval=30.0,  # no timer read within the test: only events wake the stream
    )
    current_client.set("alice")
    dispatching = asyncio.create_task(hub.run())
    seen: list[Any] = []
    try:
        request = queue_service_pb2.WatchStatusRequest(id=TASK_ID)
        async with asyncio.timeout(10):
            async for message in service.WatchStatus(request, cast(Any, Context())):
                seen.append(message.task)
                if len(seen) == 1:
                    for event in events:
                        queue.put_nowait(event)
    finally:
        dispatching.cancel()
    return seen


async def test_a_woken_stream_sends_the_record_its_event_carried_without_reading_it() -> None:
    records = CountingRecords(PENDING)
    backend = BackendInTurn("PENDING")
    events = [
        TaskChanged(TASK_ID, None, carried(dataclasses.replace(STARTED, deliveries=1))),
        TaskChanged(TASK_ID, None, carried(dataclasses.replace(SUCCEEDED, deliveries=1))),
    ]

    seen = await watched_with_events(records, events, backend)

    assert seen[-1].status == task_pb2.TASK_STATUS_SUCCESS
    assert seen[-1].result.created == 1 and seen[-1].HasField("finish_time")
    assert seen[-1].start_time.ToDatetime(tzinfo=dt.UTC) == T0
    # Each state once, in order (STARTED may be folded into SUCCESS when both came at once).
    statuses = [task.status for task in seen]
    assert statuses in (
        [task_pb2.TASK_STATUS_PENDING, task_pb2.TASK_STATUS_STARTED, task_pb2.TASK_STATUS_SUCCESS],
        [task_pb2.TASK_STATUS_PENDING, task_pb2.TASK_STATUS_SUCCESS],
    )
    assert records.reads == 1  # the first look only
    assert backend.reads == 1


async def test_a_record_no_newer_than_the_last_sent_is_read_from_the_database() -> None:
    # The event says STARTED (the first delivery), the database already says SUCCESS: the
    # events came in another order than the commits, or one was lost. The database wins.
    started = dataclasses.replace(STARTED, deliveries=1)
    records = CountingRecords(started, dataclasses.replace(SUCCEEDED, deliveries=1))
    backend = BackendInTurn("STARTED")
    stale = TaskChanged(TASK_ID, None, carried(started))

    seen = await watched_with_events(records, [stale], backend)

    assert [task.status for task in seen] == [
        task_pb2.TASK_STATUS_STARTED,
        task_pb2.TASK_STATUS_SUCCESS,
    ]
    assert records.reads == 2  # the first look, and the stale event's read


async def test_another_client_s_record_in_an_event_is_not_sent() -> None:
    records = CountingRecords(PENDING, dataclasses.replace(SUCCEEDED, deliveries=1))
    backend = BackendInTurn("PENDING")
    foreign = dataclasses.replace(SUCCEEDED, client="mallory", deliveries=1, created=99)

    seen = await watched_with_events(
        records, [TaskChanged(TASK_ID, None, carried(foreign))], backend
    )

    assert [task.status for task in seen] == [
        task_pb2.TASK_STATUS_PENDING,
        task_pb2.TASK_STATUS_SUCCESS,
    ]
    assert seen[-1].result.created == 1  # the database's, not the event's
    assert records.reads == 2


# --- the batch record an event carries -----------------------------------------------------

BATCH_ID = "223e4567-e89b-42d3-a456-426614174000"
BATCH = StoredBatch(
    id=BATCH_ID,
    client="alice",
    request_id=None,
    first_page=1,
    last_page=2,
    until_known=False,
    stop_page=None,
    next_page=3,
    pages_total=2,
    pages_succeeded=0,
    pages_failed=0,
    pages_cancelled=0,
    found=0,
    created=0,
    updated=0,
    skipped=0,
    error=None,
    enqueued_at=T0,
    started_at=None,
    finished_at=None,
    cancel_requested_at=None,
)
HALF = dataclasses.replace(BATCH, started_at=T0, pages_succeeded=1, found=3, created=3)
DONE = dataclasses.replace(HALF, pages_succeeded=2, found=6, created=6, finished_at=T0)


class CountingBatches:
    """The batch as each read finds it, the last one for every later read; counts its reads."""

    def __init__(self, *states: StoredBatch) -> None:
        self._states = list(states)
        self.reads = 0

    async def get(self, client: str, batch_id: str) -> StoredBatch:
        self.reads += 1
        return self._states.pop(0) if len(self._states) > 1 else self._states[0]


def carried_batch(batch: StoredBatch) -> dict[str, Any]:
    """The batch record a worker's end event carries (record_json of its columns)."""
    return record_json(dataclasses.asdict(batch))


async def watched_batch(batches: CountingBatches, events: list[TaskChanged]) -> list[Any]:
    """A WatchBatch stream of BATCH_ID whose hub is told `events` after its first answer."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def listen() -> AsyncIterator[Any]:
        while True:
            yield await queue.get()

    hub = EventHub(listen)
    service = QueueService(
        cast(Any, None),
        cast(Any, None),
        cast(Any, None),
        max_page=10,
        lifetime_seconds=60,
        publish_timeout=3.0,
        batches=cast(Any, batches),
        batch_limits=BatchLimits(10, 2),
        hub=hub,
        events=cast(Any, None),
        signer=TokenSigner(b"k" * 32, "d"),
        poll_interval=30.0,  # only events wake the stream
    )
    current_client.set("alice")
    dispatching = asyncio.create_task(hub.run())
    seen: list[Any] = []
    try:
        request = queue_service_pb2.WatchBatchRequest(id=BATCH_ID)
        async with asyncio.timeout(10):
            async for message in service.WatchBatch(request, cast(Any, Context())):
                seen.append(message.batch)
                if len(seen) == 1:
                    for event in events:
                        queue.put_nowait(event)
    finally:
        dispatching.cancel()
    return seen


async def test_a_woken_batch_stream_sends_the_record_its_event_carried_without_reading_it() -> None:
    batches = CountingBatches(BATCH)
    events = [
        TaskChanged(TASK_ID, BATCH_ID, None, carried_batch(HALF)),
        TaskChanged(TASK_ID, BATCH_ID, None, carried_batch(DONE)),
    ]

    seen = await watched_batch(batches, events)

    assert seen[-1].status == task_pb2.TASK_STATUS_SUCCESS
    assert seen[-1].pages_succeeded == 2 and seen[-1].totals.created == 6
    assert seen[-1].HasField("finish_time")
    assert [batch.pages_succeeded for batch in seen] in ([0, 1, 2], [0, 2])
    assert batches.reads == 1  # the first look only


async def test_a_batch_record_no_newer_than_the_last_sent_is_read_from_the_database() -> None:
    # The database already says DONE when the stream first looks; an event then carries HALF.
    batches = CountingBatches(HALF, DONE)
    stale = TaskChanged(TASK_ID, BATCH_ID, None, carried_batch(BATCH))

    seen = await watched_batch(batches, [stale])

    assert [batch.pages_succeeded for batch in seen] == [1, 2]
    assert batches.reads == 2  # the first look, and the stale event's read


async def test_another_client_s_batch_record_in_an_event_is_not_sent() -> None:
    batches = CountingBatches(BATCH, DONE)
    foreign = dataclasses.replace(DONE, client="mallory", created=99)

    seen = await watched_batch(
        batches, [TaskChanged(TASK_ID, BATCH_ID, None, carried_batch(foreign))]
    )

    assert seen[-1].totals.created == 6  # the database's, not the event's
    assert batches.reads == 2

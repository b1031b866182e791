"""The messages of batches and of tasks in flight, without a server: a batch's status from its
counts, `batch_message` field by field, and `describe` when the worker's record and Celery's
backend disagree about a task in flight."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from gateway.batches import StoredBatch
from gateway.celery_queue import CeleryState
from gateway.errors import InvalidArgument
from gateway.messages import batch_message, timestamp
from gateway.records import IssuedTask
from gateway.service import _check_batch_id, describe
from projects.v1 import task_pb2

ENQUEUED = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
STARTED = ENQUEUED + dt.timedelta(seconds=1)
FINISHED = ENQUEUED + dt.timedelta(seconds=9)
BATCH_ID = "7d1c5a4e-0000-4000-8000-000000000001"


def batch(**changes: object) -> StoredBatch:
    made = StoredBatch(
        id=BATCH_ID,
        client="alice",
        request_id=None,
        first_page=3,
        last_page=7,
        until_known=False,
        stop_page=None,
        next_page=8,
        pages_total=5,
        pages_succeeded=0,
        pages_failed=0,
        pages_cancelled=0,
        found=0,
        created=0,
        updated=0,
        skipped=0,
        error=None,
        enqueued_at=ENQUEUED,
        started_at=None,
        finished_at=None,
        cancel_requested_at=None,
    )
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({}, "PENDING"),
        ({"started_at": STARTED, "pages_succeeded": 2}, "STARTED"),
        ({"started_at": STARTED, "pages_succeeded": 5, "finished_at": FINISHED}, "SUCCESS"),
        (
            {"started_at": STARTED, "pages_succeeded": 4, "pages_failed": 1},
            "STARTED",  # not finished yet: a failed page does not end it
        ),
        (
            {
                "started_at": STARTED,
                "pages_succeeded": 4,
                "pages_failed": 1,
                "finished_at": FINISHED,
            },
            "FAILURE",
        ),
        ({"cancel_requested_at": STARTED}, "REVOKED"),  # at once, before its pages end
        (
            {"cancel_requested_at": STARTED, "pages_failed": 1, "finished_at": FINISHED},
            "REVOKED",  # a cancel says more than the failure of a page
        ),
    ],
)
def test_a_batch_s_status_comes_from_its_counts(changes: dict[str, object], status: str) -> None:
    assert batch(**changes).status == status


def test_batch_message_field_by_field() -> None:
    stored = batch(
        until_known=True,
        stop_page=5,
        pages_succeeded=3,
        pages_failed=2,
        found=30,
        created=21,
        updated=4,
        skipped=1,
        error="page 6: gone; page 7: gone",
        started_at=STARTED,
        finished_at=FINISHED,
    )
    message = batch_message(stored)
    assert message == task_pb2.Batch(
        id=BATCH_ID,
        status=task_pb2.TASK_STATUS_FAILURE,
        first_page=3,
        last_page=7,
        until_known=True,
        stop_page=5,
        pages_total=5,
        pages_succeeded=3,
        pages_failed=2,
        pages_cancelled=0,
        totals=task_pb2.BatchTotals(found=30, created=21, updated=4, skipped=1),
        error="page 6: gone; page 7: gone",
        enqueue_time=timestamp(ENQUEUED),
        start_time=timestamp(STARTED),
        finish_time=timestamp(FINISHED),
    )


def test_a_new_batch_has_no_start_finish_stop_or_error() -> None:
    message = batch_message(batch(error="kept for later"))
    assert message.status == task_pb2.TASK_STATUS_PENDING
    assert not message.HasField("start_time") and not message.HasField("finish_time")
    assert (message.stop_page, message.error) == (0, "")  # the error shows only on FAILURE


def test_a_cancelled_batch_shows_no_error_of_its_pages() -> None:
    message = batch_message(batch(cancel_requested_at=STARTED, pages_failed=1, error="page 3: x"))
    assert (message.status, message.error) == (task_pb2.TASK_STATUS_REVOKED, "")


# --- a task in flight: the record against the backend --------------------------------------


def record(status: str, error: str | None = None) -> IssuedTask:
    return IssuedTask(
        id="0b6e8a36-6f0e-4f57-9a0c-5f4c2a1d9e10",
        client="alice",
        request_id=None,
        page=3,
        enqueued_at=ENQUEUED,
        published_at=ENQUEUED,
        started_at=STARTED,
        status=status,
        error=error,
        batch_id=BATCH_ID,
    )


def state(status: str, result: object = None) -> CeleryState:
    return CeleryState(status=status, result=result, finished_at=None)


@pytest.mark.parametrize(
    ("recorded", "backend", "status"),
    [
        # The worker writes its record first, then the backend: the record is the newer.
        ("RETRY", "STARTED", task_pb2.TASK_STATUS_RETRY),
        ("STARTED", "RETRY", task_pb2.TASK_STATUS_STARTED),  # the next try has begun
        ("STARTED", "RECEIVED", task_pb2.TASK_STATUS_STARTED),
        ("RETRY", "RETRY", task_pb2.TASK_STATUS_RETRY),
    ],
)
def test_the_worker_s_record_of_a_task_in_flight_wins_over_the_backend(
    recorded: str, backend: str, status: task_pb2.TaskStatus.ValueType
) -> None:
    error = "source answered 503" if recorded == "RETRY" else None
    message = describe(record(recorded, error), state(backend, RuntimeError("older try")))
    assert message.status == status
    assert message.error == (error or "")
    assert message.batch_id == BATCH_ID and message.start_time == timestamp(STARTED)


def test_an_end_only_the_backend_knows_wins_over_the_record_in_flight() -> None:
    # A task that failed outside the worker's own code (a hard time limit, say).
    message = describe(record("RETRY", "earlier"), state("FAILURE", RuntimeError("killed")))
    assert (message.status, message.error) == (task_pb2.TASK_STATUS_FAILURE, "killed")


def test_a_task_the_worker_has_not_recorded_reads_the_backend() -> None:
    message = describe(record("PENDING"), state("STARTED"))
    assert message.status == task_pb2.TASK_STATUS_STARTED


@pytest.mark.parametrize("bad", ["", "not-a-batch", BATCH_ID + "0"])
def test_a_bad_batch_id_names_its_field(bad: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _check_batch_id(bad, "batch_id")
    assert str(caught.value).startswith("batch_id: must be a batch id as UploadPages returns it")


def test_a_batch_id_is_read_in_any_case() -> None:
    assert _check_batch_id(BATCH_ID.upper()) == BATCH_ID

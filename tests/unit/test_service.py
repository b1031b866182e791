"""gateway.service without a server: `describe` for each Celery state, and the request checks."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2

from core.db import MAX_REQUEST_ID_LENGTH
from gateway.celery_queue import CeleryState
from gateway.errors import InvalidArgument
from gateway.messages import timestamp
from gateway.records import IssuedTask
from gateway.service import (
    _check_page,
    _check_request_id,
    _check_task_id,
    describe,
)
from projects.v1 import task_pb2

TaskStatus = task_pb2.TaskStatus
ENQUEUED = dt.datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=dt.UTC)
STARTED = ENQUEUED + dt.timedelta(seconds=2)
FINISHED = ENQUEUED + dt.timedelta(seconds=5)
LOST = "lost by the broker: enqueued at 2026-03-01 12:00:00 UTC, never started; Upload again"
RESULT: dict[str, Any] = {"page": 3, "found": 10, "created": 7, "updated": 2, "skipped": 1}


def issued(*, started_at: dt.datetime | None = None, lost_reason: str | None = None) -> IssuedTask:
    task = IssuedTask(
        id="0b6e8a36-6f0e-4f57-9a0c-5f4c2a1d9e10",
        client="alice",
        request_id=None,
        page=3,
        enqueued_at=ENQUEUED,
        published_at=ENQUEUED,
        started_at=started_at,
        lost_reason=lost_reason,
    )
    if lost_reason is None:
        return task
    # The reconciler's verdict is a final state of the record (core.ledger).
    return dataclasses.replace(task, status="FAILURE", error=lost_reason, finished_at=FINISHED)


def state(
    status: str, result: object = None, finished_at: dt.datetime | None = None
) -> CeleryState:
    return CeleryState(status=status, result=result, finished_at=finished_at)


# --- describe -----------------------------------------------------------------------------------


def test_a_task_not_asked_about_yet_is_pending_with_its_record_s_fields() -> None:
    message = describe(issued(), None)

    assert message.id == "0b6e8a36-6f0e-4f57-9a0c-5f4c2a1d9e10"
    assert message.page == 3
    assert message.status == TaskStatus.TASK_STATUS_PENDING
    assert message.enqueue_time == timestamp(ENQUEUED)
    for unset in ("start_time", "finish_time", "result"):
        assert not message.HasField(unset), unset
    assert message.error == ""


def test_the_start_time_comes_from_the_record() -> None:
    message = describe(issued(started_at=STARTED), state("STARTED"))

    assert message.start_time == timestamp(STARTED)


@pytest.mark.parametrize(
    ("celery_state", "status"),
    [
        ("PENDING", TaskStatus.TASK_STATUS_PENDING),
        ("RECEIVED", TaskStatus.TASK_STATUS_PENDING),
        ("STARTED", TaskStatus.TASK_STATUS_STARTED),
        ("RETRY", TaskStatus.TASK_STATUS_RETRY),
        ("SUCCESS", TaskStatus.TASK_STATUS_SUCCESS),
        ("FAILURE", TaskStatus.TASK_STATUS_FAILURE),
        ("REJECTED", TaskStatus.TASK_STATUS_FAILURE),
        ("REVOKED", TaskStatus.TASK_STATUS_REVOKED),
        ("PROGRESS", TaskStatus.TASK_STATUS_STARTED),  # a state of no meaning here: running
    ],
)
def test_each_celery_state_has_its_status(
    celery_state: str, status: task_pb2.TaskStatus.ValueType
) -> None:
    assert describe(issued(), state(celery_state)).status == status


def test_success_carries_the_result_and_the_finish_time() -> None:
    message = describe(issued(started_at=STARTED), state("SUCCESS", dict(RESULT), FINISHED))

    assert message.status == TaskStatus.TASK_STATUS_SUCCESS
    assert message.result == task_pb2.UploadResult(**RESULT)
    assert message.finish_time == timestamp(FINISHED)
    assert message.error == ""


def test_a_result_field_the_contract_does_not_know_is_ignored() -> None:
    # A newer worker may report more than this gateway knows; what it knows still shows.
    message = describe(issued(), state("SUCCESS", {**RESULT, "pages_seen": 4}, FINISHED))

    assert message.result == task_pb2.UploadResult(**RESULT)


@pytest.mark.parametrize("result", [None, "done", ["a", "list"]])
def test_success_without_a_dict_result_has_no_result(result: object) -> None:
    message = describe(issued(), state("SUCCESS", result, FINISHED))

    assert message.status == TaskStatus.TASK_STATUS_SUCCESS
    assert not message.HasField("result")
    assert message.error == ""


@pytest.mark.parametrize("celery_state", ["FAILURE", "REVOKED"])
def test_failure_and_revocation_say_why_and_when(celery_state: str) -> None:
    error = RuntimeError("gave up on page 3 after 5 tries: 503 from the source")

    message = describe(issued(), state(celery_state, error, FINISHED))

    assert message.error == "gave up on page 3 after 5 tries: 503 from the source"
    assert message.finish_time == timestamp(FINISHED)
    assert not message.HasField("result")


@pytest.mark.parametrize("celery_state", ["RETRY", "REJECTED"])
def test_retry_and_rejection_say_why_but_have_no_finish_time(celery_state: str) -> None:
    message = describe(
        issued(), state(celery_state, TimeoutError("page 3 took too long"), FINISHED)
    )

    assert message.error == "page 3 took too long"
    assert not message.HasField("finish_time")


def test_an_error_without_words_is_named_by_its_type() -> None:
    message = describe(issued(), state("FAILURE", ConnectionResetError(), FINISHED))

    assert message.error == "ConnectionResetError"


def test_a_failure_the_backend_kept_no_reason_for_has_no_error() -> None:
    message = describe(issued(), state("FAILURE", None, FINISHED))

    assert message.status == TaskStatus.TASK_STATUS_FAILURE
    assert message.error == ""


@pytest.mark.parametrize("celery_state", ["STARTED", "SUCCESS", "PENDING"])
def test_a_finish_time_is_only_given_for_a_finished_task_s_states(celery_state: str) -> None:
    message = describe(issued(), state(celery_state, dict(RESULT), FINISHED))

    assert message.HasField("finish_time") is (celery_state == "SUCCESS")


@pytest.mark.parametrize(
    "known", [None, state("PENDING"), state("STARTED"), state("SUCCESS", dict(RESULT), FINISHED)]
)
def test_a_lost_task_is_a_failure_saying_why_whatever_the_backend_says(
    known: CeleryState | None,
) -> None:
    # The verdict is the record's final state: a message that turns up later does not run it.
    message = describe(issued(lost_reason=LOST), known)

    assert message.status == TaskStatus.TASK_STATUS_FAILURE
    assert message.error == LOST
    assert message.finish_time.ToDatetime(dt.UTC) == FINISHED


def test_a_final_record_gives_its_counts_and_its_batch() -> None:
    record = dataclasses.replace(
        issued(started_at=STARTED),
        status="SUCCESS",
        finished_at=FINISHED,
        found=10,
        created=7,
        updated=2,
        skipped=1,
        batch_id="7d1c5a4e-0000-4000-8000-000000000001",
    )
    message = describe(record, state("STARTED"))

    assert message.status == TaskStatus.TASK_STATUS_SUCCESS
    assert json_format.MessageToDict(message.result, preserving_proto_field_name=True) == RESULT
    assert message.batch_id == record.batch_id
    assert message.finish_time.ToDatetime(dt.UTC) == FINISHED


@pytest.mark.parametrize(
    ("recorded", "status"),
    [("RETRY", TaskStatus.TASK_STATUS_RETRY), ("REVOKED", TaskStatus.TASK_STATUS_REVOKED)],
)
def test_the_record_s_status_stands_when_the_backend_knows_nothing(
    recorded: str, status: task_pb2.TaskStatus.ValueType
) -> None:
    final = FINISHED if recorded == "REVOKED" else None
    record = dataclasses.replace(
        issued(started_at=STARTED), status=recorded, error="why", finished_at=final
    )

    message = describe(record, state("PENDING"))

    assert message.status == status
    assert message.error == "why"


# --- request checks -----------------------------------------------------------------------------


def violation(error: InvalidArgument) -> tuple[str, str]:
    """The field and description of the error's one BadRequest field violation."""
    (detail,) = error.details
    assert isinstance(detail, error_details_pb2.BadRequest)
    (only,) = detail.field_violations
    return only.field, only.description


@pytest.mark.parametrize("page", [1, 2, 99, 100])
def test_pages_from_1_to_max_page_pass(page: int) -> None:
    _check_page(page, 100)


def test_page_0_is_the_unset_field_and_says_page_is_required() -> None:
    with pytest.raises(InvalidArgument) as caught:
        _check_page(0, 100)

    assert violation(caught.value) == ("page", "is required: a listing page from 1 to 100")
    assert caught.value.message == "page: is required: a listing page from 1 to 100"


@pytest.mark.parametrize("page", [-1, -(2**31), 101, 2**31 - 1])
def test_pages_outside_the_site_say_the_range_and_the_page(page: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _check_page(page, 100)

    assert violation(caught.value) == ("page", f"must be from 1 to 100; got {page}")


def test_no_request_id_is_none() -> None:
    assert _check_request_id("") is None


@pytest.mark.parametrize(
    "request_id",
    ["a", "order-17/retry#2", "~!@{}[]", "x" * MAX_REQUEST_ID_LENGTH, str(uuid.uuid4())],
)
def test_printable_ascii_request_ids_pass_unchanged(request_id: str) -> None:
    assert _check_request_id(request_id) == request_id


@pytest.mark.parametrize(
    "request_id",
    [
        "x" * (MAX_REQUEST_ID_LENGTH + 1),
        "with space",
        " leading",
        "tab\there",
        "newline\n",
        "del\x7f",
        "nul\x00",
        "caf\u00e9",
        "\u0437\u0430\u043a\u0430\u0437-1",
    ],
)
def test_other_request_ids_are_refused_saying_what_is_allowed(request_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _check_request_id(request_id)

    field, description = violation(caught.value)
    assert field == "request_id"
    assert str(MAX_REQUEST_ID_LENGTH) in description
    assert "printable ASCII" in description


CANONICAL = "123e4567-e89b-42d3-a456-426614174000"


@pytest.mark.parametrize(
    "task_id",
    [
        CANONICAL,
        CANONICAL.upper(),
        "123E4567-e89b-42D3-A456-426614174000",
    ],
)
def test_task_ids_are_accepted_in_any_case_and_answered_in_lowercase(task_id: str) -> None:
    assert _check_task_id(task_id) == CANONICAL


@pytest.mark.parametrize(
    "task_id",
    [
        "",
        "not-a-task",
        CANONICAL.replace("-", ""),  # uuid.UUID would take these three
        "{" + CANONICAL + "}",
        "urn:uuid:" + CANONICAL,
        CANONICAL[:-1],
        CANONICAL + "0",
        "g" + CANONICAL[1:],
    ],
)
def test_other_task_ids_are_refused_with_an_example(task_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _check_task_id(task_id)

    field, description = violation(caught.value)
    assert field == "id"
    assert "like 123e4567-e89b-42d3-a456-426614174000" in description


# uuid.UUID drops every hyphen, and int() skips whitespace and reads non-ASCII digits: any 36
# characters that make 32 hex digits would pass, some as another task's id.
@pytest.mark.parametrize(
    "task_id",
    [
        "123e4567e-89b-42d3-a456-426614174000",  # a hyphen out of place
        "123e4567e89b42d3a456426614174000----",
        " 123e4567-e89b-42d3-a456-42661417400",  # read as 0123e456-7e89-...
        "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668-1234-1234-1234-123456789012",
    ],
)
def test_only_the_8_4_4_4_12_form_is_a_task_id(task_id: str) -> None:
    with pytest.raises(InvalidArgument):
        _check_task_id(task_id)

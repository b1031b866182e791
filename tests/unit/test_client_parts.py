"""The client's pure parts: errors from gRPC's, the retry policy, requests, the watch's cursor."""

from __future__ import annotations

import datetime
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from harvester import calls, errors
from harvester.cli import failures
from harvester.retry import RetryPolicy
from projects.v1 import project_pb2, project_service_pb2, task_pb2


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: code(), details() and trailing_metadata()."""

    def __init__(self, code: grpc.StatusCode, message: str, *details: Any) -> None:
        self._code, self._message = code, message
        self._trailers: tuple[tuple[str, bytes], ...] = ()
        if details:
            status = status_pb2.Status(code=code.value[0], message=message)
            for detail in details:
                packed = any_pb2.Any()
                packed.Pack(detail)
                status.details.append(packed)
            self._trailers = ((errors.STATUS_DETAILS_KEY, status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> Any:
        return self._trailers


def test_each_code_has_its_class_and_the_details_are_read() -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="page", description="too big")
    error = errors.from_rpc_error(
        FakeRpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "page: too big",
            error_details_pb2.BadRequest(field_violations=[violation]),
        )
    )
    assert type(error) is errors.InvalidArgument
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(error) == "page: too big"
    assert error.field_violations == (errors.FieldViolation("page", "too big"),)

    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)
    )
    busy = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "broker down", retry))
    assert type(busy) is errors.Unavailable
    assert busy.retry_delay == 2.5

    assert type(errors.from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "x"))) is (
        errors.NotFound
    )
    internal = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert type(internal) is errors.HarvesterError
    assert internal.code == grpc.StatusCode.INTERNAL
    assert isinstance(errors.Unauthenticated("x"), errors.HarvesterError)


def test_what_is_tried_again() -> None:
    policy = RetryPolicy(max_attempts=3)

    def error(code: grpc.StatusCode, delay: float | None = None) -> errors.HarvesterError:
        return errors.HarvesterError("x", code=code, retry_delay=delay)

    unavailable = error(grpc.StatusCode.UNAVAILABLE)
    assert policy.should_retry(unavailable, 1, repeatable=False)
    assert policy.should_retry(unavailable, 2, repeatable=False)
    assert not policy.should_retry(unavailable, 3, repeatable=False)  # the last try
    late = error(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert policy.should_retry(late, 1, repeatable=True)
    assert not policy.should_retry(late, 1, repeatable=False)  # a cancel is not repeated
    assert policy.should_retry(error(grpc.StatusCode.RESOURCE_EXHAUSTED, 1.0), 1, repeatable=True)
    assert not policy.should_retry(error(grpc.StatusCode.RESOURCE_EXHAUSTED), 1, repeatable=True)
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
        assert not policy.should_retry(error(code), 1, repeatable=True)


def test_backoff_grows_with_jitter_up_to_its_cap_and_honours_retry_info() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        waits = {policy.backoff(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits), (attempt, waits)
        assert len(waits) > 1  # jittered
    told = errors.Unavailable("x", retry_delay=3.0)
    assert policy.backoff(1, told) == 3.0


def test_uploads_carry_a_request_id_made_by_the_client() -> None:
    first = calls.upload_request(3, None)
    second = calls.upload_request(3, None)
    assert first.page == 3 and first.request_id and first.request_id != second.request_id
    assert calls.upload_request(3, "mine").request_id == "mine"
    batch = calls.upload_pages_request(1, 20, True, None)
    assert (batch.first_page, batch.last_page, batch.until_known) == (1, 20, True)
    assert batch.request_id


def test_list_requests_set_only_the_filters_given() -> None:
    plain = calls.list_projects_request(
        is_active=None, updated_after=None, query="", order_by="", page_size=0
    )
    assert not plain.HasField("is_active") and not plain.HasField("updated_after")
    since = calls.list_projects_request(
        is_active=False,
        updated_after=datetime.date(2026, 11, 1),
        query="bot",
        order_by="url",
        page_size=5,
    )
    assert since.HasField("is_active") and since.is_active is False
    assert since.updated_after.ToDatetime(datetime.UTC) == datetime.datetime(
        2026, 11, 1, tzinfo=datetime.UTC
    )
    failed = calls.list_tasks_request(status=task_pb2.TASK_STATUS_FAILURE, batch_id="", page_size=0)
    assert failed.HasField("status") and failed.status == task_pb2.TASK_STATUS_FAILURE
    watch = calls.watch_projects_request("c1", True, None)
    assert watch.cursor == "c1" and not watch.from_beginning  # a cursor wins


def test_a_watch_response_gives_its_cursor_on_its_last_change_only() -> None:
    response = project_service_pb2.WatchProjectsResponse(
        changes=[
            project_service_pb2.ProjectChange(
                project=project_pb2.Project(id=number), change_type=project_pb2.CHANGE_TYPE_CREATED
            )
            for number in (1, 2, 3)
        ],
        cursor="after-3",
    )
    changes = list(calls.changes_of(response))
    assert [change.project.id for change in changes] == [1, 2, 3]
    assert [change.cursor for change in changes] == [None, None, "after-3"]
    assert all(change.created for change in changes)


def test_ids_the_client_made_are_known_by_kind() -> None:
    kinds = calls.IdKinds()
    assert kinds.known_batch("B") is None
    kinds.remember(task_pb2.Batch(id="B"))
    kinds.remember(task_pb2.Task(id="T"))
    assert kinds.known_batch("b") is True
    assert kinds.known_batch("t") is False


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 2),
        (grpc.StatusCode.NOT_FOUND, 2),
        (grpc.StatusCode.UNAVAILABLE, 3),
        (grpc.StatusCode.UNAUTHENTICATED, 3),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 3),
        (grpc.StatusCode.FAILED_PRECONDITION, 1),
        (grpc.StatusCode.INTERNAL, 1),
    ],
)
def test_cli_exit_codes_of_errors(code: grpc.StatusCode, exit_code: int) -> None:
    assert failures.exit_code_of(errors.HarvesterError("x", code=code)) == exit_code


def test_cli_exit_codes_of_ends_and_the_token_hint() -> None:
    assert failures.exit_code_for(task_pb2.Task(status=task_pb2.TASK_STATUS_SUCCESS)) == 0
    assert failures.exit_code_for(task_pb2.Batch(status=task_pb2.TASK_STATUS_FAILURE)) == 1
    assert failures.exit_code_for(task_pb2.Batch(status=task_pb2.TASK_STATUS_REVOKED)) == 1
    line = failures.describe(errors.Unauthenticated("unknown token"), "h:1", token_given=False)
    assert "HARVESTER_TOKEN" in line and "make run" in line and "\n" not in line

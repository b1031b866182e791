"""The contract through the generated stubs, as another service's client uses it."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.rpc import error_details_pb2

from projects.v1 import queue_service_pb2, task_pb2
from tests.support.stack import (
    OTHER_TOKEN,
    TEST_TOKEN,
    Stack,
    get_status,
    rpc_detail,
    upload,
    wait_for_task,
)


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest:
    return rpc_detail(error, error_details_pb2.BadRequest)


def test_upload_and_status_through_stubs(module_stack: Stack) -> None:
    gateway = module_stack.gateways[0]
    task = upload(gateway, 7)
    assert task.status == task_pb2.TASK_STATUS_PENDING
    assert task.HasField("enqueue_time") and not task.HasField("finish_time")
    done = wait_for_task(gateway, task.id)
    assert done.status == task_pb2.TASK_STATUS_SUCCESS, done.error
    assert (done.result.page, done.result.found, done.result.created, done.result.skipped) == (
        7,
        10,
        10,
        0,
    )
    assert (
        done.enqueue_time.ToDatetime()
        <= done.start_time.ToDatetime()
        <= done.finish_time.ToDatetime()
    )


def test_status_codes_through_stubs(module_stack: Stack) -> None:
    gateway = module_stack.gateways[0]
    error = rpc_error(
        lambda: gateway.stub.Upload(queue_service_pb2.UploadRequest(page=1), timeout=5)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    error = rpc_error(lambda: upload(gateway, 0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation = bad_request(error).field_violations[0]
    assert violation.field == "page" and "from 1 to 10000" in violation.description

    error = rpc_error(lambda: get_status(gateway, "123"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(error).field_violations[0].field == "id"

    error = rpc_error(lambda: get_status(gateway, str(uuid.uuid4())))
    assert error.code() == grpc.StatusCode.NOT_FOUND

    mine = upload(gateway, 8, request_id="stub-" + uuid.uuid4().hex)
    error = rpc_error(lambda: get_status(gateway, mine.id, token=OTHER_TOKEN))
    assert error.code() == grpc.StatusCode.NOT_FOUND

    key = "stub-" + uuid.uuid4().hex
    first = upload(gateway, 9, request_id=key)
    assert upload(gateway, 9, request_id=key).id == first.id
    error = rpc_error(lambda: upload(gateway, 10, request_id=key))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    # The other client's request_ids live in a namespace of their own.
    theirs = upload(gateway, 10, request_id=key, token=OTHER_TOKEN)
    assert theirs.id != first.id
    assert get_status(gateway, first.id, token=TEST_TOKEN).page == 9

"""The contract as a newcomer meets it: the real grpcurl, no .proto file at hand."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from tests.support.processes import BIN, poll_until
from tests.support.stack import OTHER_TOKEN, TEST_TOKEN, Stack

GRPCURL = str(BIN / "grpcurl")
SERVICE = "projects.v1.QueueService"


def grpcurl(
    stack: Stack, *args: str, token: str | None = TEST_TOKEN, data: object = None
) -> subprocess.CompletedProcess[str]:
    command = [GRPCURL, "-plaintext", "-max-time", "15"]
    if token is not None:
        command += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [stack.gateways[0].address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def call_ok(stack: Stack, method: str, data: object) -> dict[str, object]:
    result = grpcurl(stack, f"{SERVICE}/{method}", data=data)
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def call_error(stack: Stack, method: str, data: object, token: str | None = TEST_TOKEN) -> str:
    result = grpcurl(stack, f"{SERVICE}/{method}", data=data, token=token)
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_lists_and_describes_services_by_reflection(module_stack: Stack) -> None:
    listed = grpcurl(module_stack, "list", token=None)
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    described = grpcurl(module_stack, "describe", SERVICE, token=None)
    assert (
        "rpc Upload ( .projects.v1.UploadRequest ) returns ( .projects.v1.UploadResponse )"
        in described.stdout
    )
    assert "rpc GetStatus ( .projects.v1.GetStatusRequest )" in described.stdout
    # The proto's comments, served from the descriptor set with source info.
    assert "// QueueService enqueues harvests of listing pages" in described.stdout
    assert "// Upload enqueues the harvest of one listing page" in described.stdout
    message = grpcurl(module_stack, "describe", "projects.v1.UploadRequest", token=None)
    assert message.returncode == 0, message.stderr
    assert "1 to 128 printable ASCII characters without spaces" in message.stdout
    health_described = grpcurl(module_stack, "describe", "grpc.health.v1.Health", token=None)
    assert "rpc Check" in health_described.stdout, health_described.stderr


def test_health_check_answers_serving_without_a_token(module_stack: Stack) -> None:
    for service in ("", SERVICE):
        result = grpcurl(
            module_stack, "grpc.health.v1.Health/Check", token=None, data={"service": service}
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"status": "SERVING"}


def test_upload_then_status_until_success_with_counts(module_stack: Stack) -> None:
    task = call_ok(module_stack, "Upload", {"page": 3})["task"]
    assert isinstance(task, dict)
    assert task["status"] == "TASK_STATUS_PENDING"
    assert task["page"] == 3
    uuid.UUID(str(task["id"]))

    def finished() -> dict[str, object] | None:
        answer = call_ok(module_stack, "GetStatus", {"id": task["id"]})["task"]
        assert isinstance(answer, dict)
        return (
            answer if answer["status"] in ("TASK_STATUS_SUCCESS", "TASK_STATUS_FAILURE") else None
        )

    done = poll_until(finished, 60, 0.2, "the task to finish")
    assert done["status"] == "TASK_STATUS_SUCCESS", done
    assert done["result"] == {"page": 3, "found": 10, "created": 10}
    assert {"enqueue_time", "start_time", "finish_time"} <= set(done)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, "missing authorization"),
        ("not-a-known-token", "unknown token"),
    ],
)
def test_unauthenticated(module_stack: Stack, token: str | None, expected: str) -> None:
    error = call_error(module_stack, "Upload", {"page": 1}, token=token)
    assert "Code: Unauthenticated" in error
    assert expected in error


def test_garbled_authorization_is_unauthenticated(module_stack: Stack) -> None:
    result = subprocess.run(
        [
            GRPCURL,
            "-plaintext",
            "-H",
            f"authorization: Basic {TEST_TOKEN}",
            "-d",
            '{"page": 1}',
            module_stack.gateways[0].address,
            f"{SERVICE}/Upload",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Code: Unauthenticated" in result.stderr
    assert "not a bearer token" in result.stderr


@pytest.mark.parametrize(
    ("method", "data", "field"),
    [
        ("Upload", {"page": 0}, "page"),
        ("Upload", {"page": -5}, "page"),
        ("Upload", {"page": 10_001}, "page"),
        ("Upload", {"page": 1, "request_id": "has space"}, "request_id"),
        ("Upload", {"page": 1, "request_id": "x" * 129}, "request_id"),
        ("GetStatus", {"id": "not-a-task-id"}, "id"),
        ("GetStatus", {"id": ""}, "id"),
    ],
)
def test_invalid_argument_names_the_field(
    module_stack: Stack, method: str, data: object, field: str
) -> None:
    error = call_error(module_stack, method, data)
    assert "Code: InvalidArgument" in error
    assert f'"field":"{field}"' in error.replace(" ", "")
    assert "google.rpc.BadRequest" in error


def test_unknown_and_foreign_ids_are_not_found(module_stack: Stack) -> None:
    error = call_error(module_stack, "GetStatus", {"id": str(uuid.uuid4())})
    assert "Code: NotFound" in error
    theirs = call_ok(module_stack, "Upload", {"page": 4})["task"]
    assert isinstance(theirs, dict)
    error = call_error(module_stack, "GetStatus", {"id": theirs["id"]}, token=OTHER_TOKEN)
    assert "Code: NotFound" in error


def test_request_id_returns_the_same_task_and_refuses_another_page(module_stack: Stack) -> None:
    request_id = f"retry-{uuid.uuid4()}"
    first = call_ok(module_stack, "Upload", {"page": 5, "request_id": request_id})["task"]
    again = call_ok(module_stack, "Upload", {"page": 5, "request_id": request_id})["task"]
    assert isinstance(first, dict) and isinstance(again, dict)
    assert again["id"] == first["id"]
    error = call_error(module_stack, "Upload", {"page": 6, "request_id": request_id})
    assert "Code: AlreadyExists" in error
    assert str(first["id"]) in error

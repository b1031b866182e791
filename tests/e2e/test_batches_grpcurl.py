"""Batches, listing, cancelling and watching as a newcomer meets them: the real grpcurl, no
.proto file at hand (reflection), against the module's stack (gateway, one worker, SQLite).

grpcurl prints proto field names, enums by name, int64 counts as strings, and leaves out
fields that are zero; a server stream is its messages one after another.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

from tests.support.processes import BIN
from tests.support.stack import OTHER_TOKEN, TEST_TOKEN, Stack

GRPCURL = str(BIN / "grpcurl")
SERVICE = "projects.v1.QueueService"


def grpcurl(
    stack: Stack,
    *args: str,
    token: str | None = TEST_TOKEN,
    data: object = None,
    max_time: float = 15,
) -> subprocess.CompletedProcess[str]:
    command = [GRPCURL, "-plaintext", "-max-time", str(max_time)]
    if token is not None:
        command += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [stack.gateways[0].address, *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=max_time + 15, check=False
    )


def call_ok(stack: Stack, method: str, data: object, token: str = TEST_TOKEN) -> Any:
    result = grpcurl(stack, f"{SERVICE}/{method}", data=data, token=token)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def call_error(stack: Stack, method: str, data: object, token: str = TEST_TOKEN) -> str:
    result = grpcurl(stack, f"{SERVICE}/{method}", data=data, token=token)
    assert result.returncode != 0, result.stdout
    return result.stderr


def json_messages(output: str) -> list[Any]:
    """The JSON objects grpcurl printed for a stream, one after another."""
    decoder = json.JSONDecoder()
    messages: list[Any] = []
    position = 0
    while True:
        while position < len(output) and output[position].isspace():
            position += 1
        if position == len(output):
            return messages
        message, position = decoder.raw_decode(output, position)
        messages.append(message)


def test_the_new_calls_are_described_by_reflection(module_stack: Stack) -> None:
    described = grpcurl(module_stack, "describe", SERVICE, token=None)
    assert described.returncode == 0, described.stderr
    for line in (
        "rpc UploadPages ( .projects.v1.UploadPagesRequest ) returns "
        "( .projects.v1.UploadPagesResponse )",
        "rpc GetBatch ( .projects.v1.GetBatchRequest )",
        "rpc WatchStatus ( .projects.v1.WatchStatusRequest ) returns "
        "( stream .projects.v1.WatchStatusResponse )",
        "rpc WatchBatch ( .projects.v1.WatchBatchRequest ) returns "
        "( stream .projects.v1.WatchBatchResponse )",
        "rpc CancelTask ( .projects.v1.CancelTaskRequest )",
        "rpc CancelBatch ( .projects.v1.CancelBatchRequest )",
        "rpc ListTasks ( .projects.v1.ListTasksRequest )",
    ):
        assert line in described.stdout, line
    message = grpcurl(module_stack, "describe", "projects.v1.UploadPagesRequest", token=None)
    assert "bool until_known = 4;" in message.stdout, message.stdout


def test_upload_pages_watch_the_batch_then_get_it_and_list_its_tasks(
    module_stack: Stack,
) -> None:
    batch = call_ok(module_stack, "UploadPages", {"first_page": 11, "last_page": 14})["batch"]
    uuid.UUID(batch["id"])
    assert (batch["first_page"], batch["last_page"], batch["pages_total"]) == (11, 14, 4)
    assert batch["status"] in ("TASK_STATUS_PENDING", "TASK_STATUS_STARTED")
    assert "until_known" not in batch and "finish_time" not in batch  # false and unset

    watched = grpcurl(module_stack, f"{SERVICE}/WatchBatch", data={"id": batch["id"]}, max_time=60)
    assert watched.returncode == 0, watched.stderr  # the stream ended by itself
    messages = [message["batch"] for message in json_messages(watched.stdout)]
    assert messages, watched.stdout
    last = messages[-1]
    assert last["status"] == "TASK_STATUS_SUCCESS"
    assert last["pages_succeeded"] == 4 and "pages_failed" not in last
    assert last["totals"] == {"found": "40", "created": "40"}  # int64 as strings
    assert {"enqueue_time", "start_time", "finish_time"} <= set(last)
    assert all("finish_time" not in message for message in messages[:-1])

    assert call_ok(module_stack, "GetBatch", {"id": batch["id"]})["batch"] == last
    listed = call_ok(module_stack, "ListTasks", {"batch_id": batch["id"]})
    assert "next_page_token" not in listed
    tasks = listed["tasks"]
    assert sorted(task["page"] for task in tasks) == [11, 12, 13, 14]
    assert {task["batch_id"] for task in tasks} == {batch["id"]}
    assert {task["status"] for task in tasks} == {"TASK_STATUS_SUCCESS"}
    assert all(task["result"]["created"] == 10 for task in tasks)  # int32: a number
    first = call_ok(module_stack, "ListTasks", {"batch_id": batch["id"], "page_size": 3})
    assert len(first["tasks"]) == 3 and first["next_page_token"]
    rest = call_ok(
        module_stack,
        "ListTasks",
        {"batch_id": batch["id"], "page_size": 3, "page_token": first["next_page_token"]},
    )
    assert [t["id"] for t in first["tasks"] + rest["tasks"]] == [t["id"] for t in tasks]
    only_failed = call_ok(
        module_stack, "ListTasks", {"batch_id": batch["id"], "status": "TASK_STATUS_FAILURE"}
    )
    assert only_failed == {}  # no tasks, no token: grpcurl prints an empty object

    # A finished batch cannot be cancelled, nor its finished pages; the answer says why.
    error = call_error(module_stack, "CancelBatch", {"id": batch["id"]})
    assert "Code: FailedPrecondition" in error and "SUCCESS" in error
    error = call_error(module_stack, "CancelTask", {"id": tasks[0]["id"]})
    assert "Code: FailedPrecondition" in error
    assert f"task {tasks[0]['id']} has finished: SUCCESS" in error
    # Another client sees neither the batch nor its tasks.
    error = call_error(module_stack, "GetBatch", {"id": batch["id"]}, token=OTHER_TOKEN)
    assert "Code: NotFound" in error
    error = call_error(module_stack, "CancelTask", {"id": tasks[0]["id"]}, token=OTHER_TOKEN)
    assert "Code: NotFound" in error


def test_watch_status_prints_each_state_and_ends_after_the_final_one(module_stack: Stack) -> None:
    task = call_ok(module_stack, "Upload", {"page": 15})["task"]
    watched = grpcurl(module_stack, f"{SERVICE}/WatchStatus", data={"id": task["id"]}, max_time=60)
    assert watched.returncode == 0, watched.stderr
    states = [message["task"]["status"] for message in json_messages(watched.stdout)]
    assert states[-1] == "TASK_STATUS_SUCCESS", states
    assert len(states) == len(set(states)), states  # each state once, in order
    final = json_messages(watched.stdout)[-1]["task"]
    assert final["result"] == {"page": 15, "found": 10, "created": 10}


def test_a_request_id_batch_and_field_violations(module_stack: Stack) -> None:
    request_id = f"grpcurl-{uuid.uuid4()}"
    asked = {"first_page": 16, "last_page": 17, "request_id": request_id, "until_known": True}
    first = call_ok(module_stack, "UploadPages", asked)["batch"]
    assert first["until_known"] is True
    again = call_ok(module_stack, "UploadPages", asked)["batch"]
    assert again["id"] == first["id"]
    error = call_error(module_stack, "UploadPages", {**asked, "last_page": 18})
    assert "Code: AlreadyExists" in error and first["id"] in error
    for data, field in (
        ({"first_page": 0, "last_page": 3}, "first_page"),
        ({"first_page": 4, "last_page": 3}, "last_page"),
        ({"first_page": 1, "last_page": 10_001}, "last_page"),
        ({"first_page": 1, "last_page": 1_001}, "last_page"),  # MAX_BATCH_PAGES is 1000
    ):
        error = call_error(module_stack, "UploadPages", data)
        assert "Code: InvalidArgument" in error, data
        assert f'"field":"{field}"' in error.replace(" ", ""), (data, error)
        assert "google.rpc.BadRequest" in error
    error = call_error(module_stack, "ListTasks", {"page_size": -1})
    assert "Code: InvalidArgument" in error and '"field":"page_size"' in error.replace(" ", "")
    error = call_error(module_stack, "WatchBatch", {"id": str(uuid.uuid4())})
    assert "Code: NotFound" in error

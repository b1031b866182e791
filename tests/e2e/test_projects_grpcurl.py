"""ProjectService as a newcomer meets it: the real grpcurl, reflection, no .proto file at hand.

Two listing pages are harvested once for the module (through the stubs, as a client would
Upload them); every test then reads them with grpcurl as the README shows it.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.support.processes import BIN
from tests.support.stack import TEST_TOKEN, Stack, upload, wait_for_task

GRPCURL = str(BIN / "grpcurl")
SERVICE = "projects.v1.ProjectService"
PAGES = (1, 2)
PER_PAGE = 10  # the sample site's projects per listing page


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
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def call_ok(stack: Stack, method: str, data: object) -> dict[str, Any]:
    result = grpcurl(stack, f"{SERVICE}/{method}", data=data)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def call_error(stack: Stack, method: str, data: object, token: str | None = TEST_TOKEN) -> str:
    result = grpcurl(stack, f"{SERVICE}/{method}", data=data, token=token)
    assert result.returncode != 0, result.stdout
    assert result.stdout == ""
    return result.stderr


def json_objects(text: str) -> list[dict[str, Any]]:
    """The messages grpcurl prints for a stream: JSON objects one after the other."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return found
        value, at = decoder.raw_decode(text, at)
        found.append(value)


def watch(stack: Stack, data: object, seconds: float = 3) -> list[dict[str, Any]]:
    """What WatchProjects streams within `seconds` (grpcurl then ends it: DeadlineExceeded)."""
    result = grpcurl(stack, f"{SERVICE}/WatchProjects", data=data, max_time=seconds)
    assert "Code: DeadlineExceeded" in result.stderr, result.stderr
    return json_objects(result.stdout)


@pytest.fixture(scope="module")
def harvested(module_stack: Stack) -> dict[str, Any]:
    """The module's harvest: every stored project by url, as the database holds it."""
    gateway = module_stack.gateways[0]
    for page in PAGES:
        task = wait_for_task(gateway, upload(gateway, page).id)
        assert task.result.found == PER_PAGE, task
    projects = module_stack.projects()
    assert len(projects) >= PER_PAGE * len(PAGES)
    return projects


def test_lists_and_describes_the_project_service_with_its_comments(module_stack: Stack) -> None:
    listed = grpcurl(module_stack, "list", token=None)
    assert listed.returncode == 0, listed.stderr
    assert SERVICE in listed.stdout.split()

    described = grpcurl(module_stack, "describe", SERVICE, token=None)
    assert described.returncode == 0, described.stderr
    for rpc in (
        "rpc ListProjects ( .projects.v1.ListProjectsRequest ) "
        "returns ( .projects.v1.ListProjectsResponse )",
        "rpc GetProject ( .projects.v1.GetProjectRequest ) "
        "returns ( .projects.v1.GetProjectResponse )",
        "rpc WatchProjects ( .projects.v1.WatchProjectsRequest ) "
        "returns ( stream .projects.v1.WatchProjectsResponse )",
    ):
        assert rpc in described.stdout, described.stdout
    # The proto's comments, served from the descriptor set with source info.
    assert "// ProjectService reads the harvested projects" in described.stdout
    assert "// WatchProjects streams projects as harvests create or change them" in (
        described.stdout
    )
    request = grpcurl(module_stack, "describe", "projects.v1.ListProjectsRequest", token=None)
    assert '"update_time desc" (the default when empty)' in request.stdout, request.stderr


def test_list_projects_pages_in_the_order_asked_for(
    module_stack: Stack, harvested: dict[str, Any]
) -> None:
    urls = sorted(harvested)
    first = call_ok(module_stack, "ListProjects", {"page_size": 5, "order_by": "url"})

    assert [p["url"] for p in first["projects"]] == urls[:5]
    assert first["next_page_token"]
    project = first["projects"][0]
    assert {"id", "url", "title", "create_time", "update_time", "last_seen_time"} <= set(project)

    second = call_ok(
        module_stack,
        "ListProjects",
        {"page_size": 5, "order_by": "url", "page_token": first["next_page_token"]},
    )
    assert [p["url"] for p in second["projects"]] == urls[5:10]

    everything = call_ok(module_stack, "ListProjects", {"page_size": 1000, "order_by": "url"})
    assert [p["url"] for p in everything["projects"]] == urls
    assert "next_page_token" not in everything  # empty on the last page: grpcurl leaves it out


def test_list_projects_newest_first_by_default_and_filtered(
    module_stack: Stack, harvested: dict[str, Any]
) -> None:
    newest = call_ok(module_stack, "ListProjects", {"page_size": 1000})["projects"]
    updated = [p["update_time"] for p in newest]
    assert updated == sorted(updated, reverse=True)
    assert len(newest) == len(harvested)

    active = call_ok(module_stack, "ListProjects", {"page_size": 1000, "is_active": True})
    expected = {url for url, row in harvested.items() if row.is_active}
    assert {p["url"] for p in active["projects"]} == expected
    assert all(p["is_active"] for p in active["projects"])


def test_get_project_by_id_and_by_url(module_stack: Stack, harvested: dict[str, Any]) -> None:
    url, row = sorted(harvested.items())[0]

    by_id = call_ok(module_stack, "GetProject", {"id": row.id})["project"]
    by_url = call_ok(module_stack, "GetProject", {"url": url})["project"]

    assert by_id == by_url
    assert by_id["url"] == url
    assert by_id["title"] == row.title
    assert int(by_id["id"]) == row.id  # an int64: JSON gives it as a string


def test_get_project_unknown_is_not_found(module_stack: Stack, harvested: dict[str, Any]) -> None:
    error = call_error(module_stack, "GetProject", {"id": 987654321})
    assert "Code: NotFound" in error
    assert "Message: no project with id 987654321 has been harvested" in error

    error = call_error(module_stack, "GetProject", {"url": "https://nowhere.test/x"})
    assert "Code: NotFound" in error
    assert "no project with url 'https://nowhere.test/x' has been harvested" in error


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        ({"page_size": -1}, "page_size", "must not be negative; got -1"),
        (
            {"order_by": "title"},
            "order_by",
            "must be one of 'update_time desc', 'create_time desc', 'start_date desc', 'url'; "
            "got 'title'",
        ),
        ({"page_token": "not-a-token"}, "page_token", "is garbled"),
    ],
)
def test_list_projects_invalid_arguments_name_the_field(
    module_stack: Stack, data: dict[str, Any], field: str, says: str
) -> None:
    error = call_error(module_stack, "ListProjects", data)

    assert "Code: InvalidArgument" in error
    assert f"Message: {field}: {says}" in error
    assert "google.rpc.BadRequest" in error
    assert f'"field":"{field}"' in error.replace(" ", "")


def test_a_page_token_for_another_order_is_refused(
    module_stack: Stack, harvested: dict[str, Any]
) -> None:
    first = call_ok(module_stack, "ListProjects", {"page_size": 2, "order_by": "url"})

    error = call_error(
        module_stack, "ListProjects", {"page_size": 2, "page_token": first["next_page_token"]}
    )

    assert "Code: InvalidArgument" in error
    assert "page_token: was made for order_by 'url', not 'update_time desc'" in error


@pytest.mark.parametrize("method", ["ListProjects", "GetProject", "WatchProjects"])
def test_no_token_is_unauthenticated(module_stack: Stack, method: str) -> None:
    error = call_error(module_stack, method, {}, token=None)

    assert "Code: Unauthenticated" in error
    assert "missing authorization" in error


def test_watch_from_the_beginning_streams_every_harvested_project(
    module_stack: Stack, harvested: dict[str, Any]
) -> None:
    responses = watch(module_stack, {"from_beginning": True})

    changes = [change for response in responses for change in response["changes"]]
    urls = [change["project"]["url"] for change in changes]
    assert set(urls) == set(harvested)
    assert len(urls) == len(set(urls))  # each project once
    for change in changes:
        assert change["change_type"] in ("CHANGE_TYPE_CREATED", "CHANGE_TYPE_UPDATED")
    assert all(response["cursor"] and response["changes"] for response in responses)

    # A cursor resumes after its response's changes: none of them comes again.
    assert watch(module_stack, {"cursor": responses[-1]["cursor"]}, seconds=2) == []


def test_watch_with_a_garbled_cursor_is_invalid(module_stack: Stack) -> None:
    error = call_error(module_stack, "WatchProjects", {"cursor": "garbled"})

    assert "Code: InvalidArgument" in error
    assert "cursor: is garbled" in error

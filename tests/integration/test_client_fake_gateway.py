"""The client against an in-process fake gateway: what it sends, when it tries again, how it
follows page tokens and resumes a watch. Fast: no real gateway, worker or database."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from harvester import AsyncClient, Client, Connection, InvalidArgument, RetryPolicy, Unavailable
from projects.v1 import (
    project_pb2,
    project_service_pb2,
    project_service_pb2_grpc,
    queue_service_pb2,
    queue_service_pb2_grpc,
    task_pb2,
)

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


@dataclass
class FakeGateway(
    queue_service_pb2_grpc.QueueServiceServicer, project_service_pb2_grpc.ProjectServiceServicer
):
    unavailable_uploads: int = 0
    uploads: list[tuple[str, float | None, tuple[Any, ...]]] = field(default_factory=list)
    watch_requests: list[project_service_pb2.WatchProjectsRequest] = field(default_factory=list)
    list_tokens: list[str] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)

    def Upload(self, request: Any, context: Any) -> Any:
        self.uploads.append(
            (request.request_id, context.time_remaining(), tuple(context.invocation_metadata()))
        )
        if request.page == 0:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field="page", description="must be from 1"
            )
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message="page: must be from 1", details=[detail]
            )
            context.abort_with_status(rpc_status.to_status(status))
        if len(self.uploads) <= self.unavailable_uploads:
            context.abort(grpc.StatusCode.UNAVAILABLE, "broker down")
        return queue_service_pb2.UploadResponse(
            task=task_pb2.Task(id="t-1", page=request.page, status=task_pb2.TASK_STATUS_PENDING)
        )

    def ListProjects(self, request: Any, context: Any) -> Any:
        self.list_tokens.append(request.page_token)
        page = int(request.page_token or 0)
        projects = [project_pb2.Project(id=page * 2 + n) for n in (1, 2)]
        return project_service_pb2.ListProjectsResponse(
            projects=projects, next_page_token=str(page + 1) if page < 2 else ""
        )

    def WatchProjects(self, request: Any, context: Any) -> Iterator[Any]:
        self.watch_requests.append(request)

        def changes(*ids: int) -> Any:
            return project_service_pb2.WatchProjectsResponse(
                changes=[
                    project_service_pb2.ProjectChange(
                        project=project_pb2.Project(id=i),
                        change_type=project_pb2.CHANGE_TYPE_UPDATED,
                    )
                    for i in ids
                ],
                cursor=f"after-{ids[-1]}",
            )

        if len(self.watch_requests) == 1:
            yield changes(1, 2)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        yield changes(3)
        self.released.wait(10)


@pytest.fixture
def fake() -> Iterator[tuple[FakeGateway, str]]:
    gateway = FakeGateway()  # type: ignore[abstract]  # the calls it leaves out are UNIMPLEMENTED
    server = grpc.server(futures.ThreadPoolExecutor(8))
    queue_service_pb2_grpc.add_QueueServiceServicer_to_server(gateway, server)
    project_service_pb2_grpc.add_ProjectServiceServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield gateway, f"127.0.0.1:{port}"
    gateway.released.set()
    server.stop(None)


def test_an_unavailable_upload_is_tried_again_with_the_same_request_id_and_a_deadline(
    fake: tuple[FakeGateway, str],
) -> None:
    gateway, address = fake
    gateway.unavailable_uploads = 2
    with Client(address, "tok", deadline=7, retry=FAST) as client:
        task = client.upload(5)
    assert task.id == "t-1"
    ids = {request_id for request_id, _, _ in gateway.uploads}
    assert len(gateway.uploads) == 3 and len(ids) == 1 and ids != {""}
    for _, left, metadata in gateway.uploads:
        assert left is not None and 5 < left < 7.5  # the deadline given, not none
        assert ("authorization", "Bearer tok") in metadata


def test_an_upload_unavailable_every_time_ends_unavailable(fake: tuple[FakeGateway, str]) -> None:
    gateway, address = fake
    gateway.unavailable_uploads = 100
    with Client(address, "tok", retry=FAST) as client, pytest.raises(Unavailable) as caught:
        client.upload(5)
    assert len(gateway.uploads) == FAST.max_attempts
    assert caught.value.message == "broker down"


def test_invalid_argument_is_not_tried_again_and_carries_its_field(
    fake: tuple[FakeGateway, str],
) -> None:
    gateway, address = fake
    with Client(address, "tok", retry=FAST) as client, pytest.raises(InvalidArgument) as caught:
        client.upload(0)
    assert len(gateway.uploads) == 1
    assert [(v.field, v.description) for v in caught.value.field_violations] == [
        ("page", "must be from 1")
    ]


def test_list_projects_follows_page_tokens_and_stops_at_its_limit(
    fake: tuple[FakeGateway, str],
) -> None:
    gateway, address = fake
    with Client(address, "tok") as client:
        assert [p.id for p in client.list_projects()] == [1, 2, 3, 4, 5, 6]
        assert gateway.list_tokens == ["", "1", "2"]
        gateway.list_tokens.clear()
        assert [p.id for p in client.list_projects(limit=3)] == [1, 2, 3]
        assert gateway.list_tokens == ["", "1"]


def test_watch_projects_resumes_from_the_last_cursor_after_unavailable(
    fake: tuple[FakeGateway, str],
) -> None:
    gateway, address = fake
    with Client(address, "tok", reconnect=FAST) as client:
        changes = client.watch_projects(from_beginning=True)
        seen = [next(changes) for _ in range(3)]
        changes.close()
    assert [(c.project.id, c.cursor) for c in seen] == [(1, None), (2, "after-2"), (3, "after-3")]
    first, second = gateway.watch_requests
    assert first.from_beginning and not first.cursor
    assert second.cursor == "after-2" and not second.from_beginning


async def test_the_async_client_retries_and_resumes_alike(fake: tuple[FakeGateway, str]) -> None:
    gateway, address = fake
    gateway.unavailable_uploads = 1
    async with AsyncClient(address, "tok", retry=FAST, reconnect=FAST) as client:
        task = await client.upload(4)
        assert task.id == "t-1" and len({r for r, _, _ in gateway.uploads}) == 1
        assert len(gateway.uploads) == 2
        seen = []
        async for change in client.watch_projects(cursor="start"):
            seen.append((change.project.id, change.cursor))
            if len(seen) == 3:
                break
        assert [p.id async for p in client.list_projects(limit=5)] == [1, 2, 3, 4, 5]
    assert seen == [(1, None), (2, "after-2"), (3, "after-3")]
    assert [r.cursor for r in gateway.watch_requests] == ["start", "after-2"]


def test_tls_and_a_client_certificate_from_the_connection(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("client.example")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client-key.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    gateway = FakeGateway()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(4))
    queue_service_pb2_grpc.add_QueueServiceServicer_to_server(gateway, server)
    credentials = grpc.ssl_server_credentials(
        [(server_cert.private_key_pem.bytes(), server_cert.cert_chain_pems[0].bytes())],
        root_certificates=ca.cert_pem.bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        mutual = Connection(
            address=f"127.0.0.1:{port}",
            token="tok",
            tls_ca_file=tmp_path / "ca.pem",
            tls_cert_file=tmp_path / "client.pem",
            tls_key_file=tmp_path / "client-key.pem",
        )
        with Client(connection=mutual) as client:
            assert client.upload(2).id == "t-1"
        no_certificate = dataclasses.replace(mutual, tls_cert_file=None, tls_key_file=None)
        with (
            Client(connection=no_certificate, retry=FAST) as refused,
            pytest.raises(Unavailable),
        ):
            refused.upload(2)
    finally:
        server.stop(None)
    assert len(gateway.uploads) == 1

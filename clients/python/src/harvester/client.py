"""The synchronous client: one channel to one gateway, every call with a deadline and retries.

    with Client("127.0.0.1:50051", token="...") as client:
        task = client.upload(3)
        done = client.wait(task.id, timeout=60)

Calls answer with the generated messages (`projects.v1`'s Task, Batch, Project) and fail with
`harvester.errors`. The asyncio flavour, `harvester.aio.AsyncClient`, has the same methods.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harvester import calls
from harvester.calls import Batch, Project, Task, TaskStatus, WatchedChange
from harvester.connection import DEFAULT_ADDRESS, DEFAULT_DEADLINE_SECONDS, Connection
from harvester.errors import DeadlineExceeded, FailedPrecondition, NotFound, from_rpc_error
from harvester.retry import DEFAULT_RECONNECT, DEFAULT_RETRY, RetryPolicy
from projects.v1 import (
    project_service_pb2,
    project_service_pb2_grpc,
    queue_service_pb2,
    queue_service_pb2_grpc,
    task_pb2,
)

Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)


class Client:
    """A client of one gateway. Thread-safe (gRPC channels are); close it, or use `with`."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        token: str | None = None,
        *,
        tls_ca_file: str | Path | None = None,
        deadline: float = DEFAULT_DEADLINE_SECONDS,
        retry: RetryPolicy = DEFAULT_RETRY,
        reconnect: RetryPolicy = DEFAULT_RECONNECT,
        connection: Connection | None = None,
    ) -> None:
        self.connection = connection or Connection(
            address=address,
            token=token,
            tls_ca_file=Path(tls_ca_file) if tls_ca_file else None,
            deadline=deadline,
        )
        self._retry = retry
        self._reconnect = reconnect
        credentials = self.connection.credentials()
        self._channel = (
            grpc.secure_channel(self.connection.address, credentials)
            if credentials is not None
            else grpc.insecure_channel(self.connection.address)
        )
        self._queue = queue_service_pb2_grpc.QueueServiceStub(self._channel)
        self._projects = project_service_pb2_grpc.ProjectServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._kinds = calls.IdKinds()

    @classmethod
    def from_env(cls) -> Client:
        """A client configured by HARVESTER_ADDRESS, HARVESTER_TOKEN, HARVESTER_TLS_* ..."""
        return cls(connection=Connection.from_env())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    # --- one call, tried again when that is safe ---

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        *,
        repeatable: bool = True,
    ) -> Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(
                    request, timeout=self.connection.deadline, metadata=self.connection.metadata
                )
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if not self._retry.should_retry(error, attempt, repeatable=repeatable):
                    raise error from exc
            time.sleep(self._retry.backoff(attempt, error))

    # --- QueueService ---

    def upload(self, page: int, *, request_id: str | None = None) -> Task:
        """Enqueue the harvest of one listing page; the task, PENDING. Retried with one
        request_id (made here unless given), so it never enqueues twice."""
        request = calls.upload_request(page, request_id)
        task = self._unary(self._queue.Upload, request).task
        self._kinds.remember(task)
        return task

    def upload_pages(
        self, first: int, last: int, *, until_known: bool = False, request_id: str | None = None
    ) -> Batch:
        """Enqueue pages `first` to `last` as one batch; with until_known, stop after the
        first page on which nothing was new."""
        request = calls.upload_pages_request(first, last, until_known, request_id)
        batch = self._unary(self._queue.UploadPages, request).batch
        self._kinds.remember(batch)
        return batch

    def task(self, id_: str) -> Task:
        request = queue_service_pb2.GetStatusRequest(id=id_)
        return self._unary(self._queue.GetStatus, request).task

    def batch(self, id_: str) -> Batch:
        request = queue_service_pb2.GetBatchRequest(id=id_)
        return self._unary(self._queue.GetBatch, request).batch

    def status(self, id_: str) -> Task | Batch:
        """A task or a batch as it is now, by its id (NotFound if it is neither)."""
        known = self._kinds.known_batch(id_)
        if known is not None:
            return self.batch(id_) if known else self.task(id_)
        try:
            return self._kinds.remember(self.task(id_))
        except NotFound:
            return self._kinds.remember(self.batch(id_))

    def _follow(self, open_stream: Callable[[], grpc.CallIterator[Response]]) -> Iterator[Response]:
        """The messages of a server stream, opened again by `open_stream` (which picks up
        where the last one stopped) after UNAVAILABLE, until it ends; a message received
        resets the reconnect budget."""
        attempt = 0
        while True:
            stream = open_stream()
            try:
                for message in stream:
                    attempt = 0
                    yield message
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                attempt += 1
                if not self._reconnect.should_retry(error, attempt, repeatable=False):
                    raise error from exc
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
            time.sleep(self._reconnect.backoff(attempt, error))

    def watch(self, id_: str, *, timeout: float | None = None) -> Iterator[Task | Batch]:
        """A task's or a batch's state now, then after each change, ending after the final
        one (WatchStatus / WatchBatch, reconnecting after UNAVAILABLE; never polling)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        metadata = self.connection.metadata
        items: Iterator[Task | Batch]
        if isinstance(self.status(id_), Batch):
            batch_request = queue_service_pb2.WatchBatchRequest(id=id_)
            items = (
                answer.batch
                for answer in self._follow(
                    lambda: self._queue.WatchBatch(batch_request, left(), metadata)
                )
            )
        else:
            task_request = queue_service_pb2.WatchStatusRequest(id=id_)
            items = (
                answer.task
                for answer in self._follow(
                    lambda: self._queue.WatchStatus(task_request, left(), metadata)
                )
            )
        for item in items:
            yield item
            if calls.is_final(item):
                return

    def wait(self, id_: str, timeout: float | None = None) -> Task | Batch:
        """Block until the task or batch has finished (SUCCESS, FAILURE or REVOKED); its final
        state. DeadlineExceeded if it has not after `timeout` seconds."""
        last: Task | Batch | None = None
        for state in self.watch(id_, timeout=timeout):
            last = state
        if last is None or not calls.is_final(last):
            raise DeadlineExceeded(f"{id_} has not finished after {timeout} s")
        return last

    def cancel(self, id_: str) -> Task | Batch:
        """Cancel a task or a batch; it as recorded then. Safe to repeat: one that is already
        cancelled (by a try whose answer was lost, say) is returned as it is; one that finished
        otherwise is FailedPrecondition."""
        try:
            if isinstance(self.status(id_), Batch):
                request = queue_service_pb2.CancelBatchRequest(id=id_)
                return self._unary(self._queue.CancelBatch, request).batch
            task_request = queue_service_pb2.CancelTaskRequest(id=id_)
            return self._unary(self._queue.CancelTask, task_request).task
        except FailedPrecondition:
            now = self.status(id_)
            if now.status == task_pb2.TASK_STATUS_REVOKED:
                return now
            raise

    def tasks(
        self,
        *,
        status: TaskStatus.ValueType | None = None,
        batch_id: str = "",
        limit: int | None = None,
        page_size: int = 0,
    ) -> Iterator[Task]:
        """Your tasks, newest first, following page tokens (ListTasks); at most `limit`."""
        request = calls.list_tasks_request(status=status, batch_id=batch_id, page_size=page_size)
        given = 0
        while True:
            answer = self._unary(self._queue.ListTasks, request)
            for task in answer.tasks:
                if limit is not None and given >= limit:
                    return
                given += 1
                yield task
            if not answer.next_page_token:
                return
            request.page_token = answer.next_page_token

    # --- ProjectService ---

    def list_projects(
        self,
        *,
        is_active: bool | None = None,
        updated_after: datetime.datetime | datetime.date | None = None,
        query: str = "",
        order_by: str = "",
        limit: int | None = None,
        page_size: int = 0,
    ) -> Iterator[Project]:
        """Projects, filtered and ordered, following page tokens until the last page."""
        request = calls.list_projects_request(
            is_active=is_active,
            updated_after=updated_after,
            query=query,
            order_by=order_by,
            page_size=page_size,
        )
        given = 0
        while True:
            answer = self._unary(self._projects.ListProjects, request)
            for project in answer.projects:
                if limit is not None and given >= limit:
                    return
                given += 1
                yield project
            if not answer.next_page_token:
                return
            request.page_token = answer.next_page_token

    def project(self, *, id_: int | None = None, url: str | None = None) -> Project:
        request = (
            project_service_pb2.GetProjectRequest(id=id_)
            if id_ is not None
            else project_service_pb2.GetProjectRequest(url=url or "")
        )
        return self._unary(self._projects.GetProject, request).project

    def watch_projects(
        self,
        cursor: str | None = None,
        *,
        from_beginning: bool = False,
        is_active: bool | None = None,
    ) -> Generator[WatchedChange, None, None]:
        """Every project change after `cursor` (or from the beginning, or from now), in
        commit order, forever. After UNAVAILABLE or a gateway restart it reconnects from the
        last cursor it received, so no change is missed and none comes twice. No deadline: it
        runs until you stop iterating (the gateway's keepalive pings notice a dead peer)."""
        position = cursor

        def open_stream() -> grpc.CallIterator[project_service_pb2.WatchProjectsResponse]:
            request = calls.watch_projects_request(position, from_beginning, is_active)
            return self._projects.WatchProjects(request, metadata=self.connection.metadata)

        while True:
            for response in self._follow(open_stream):
                yield from calls.changes_of(response)
                position = response.cursor or position
            # The gateway ends a watch only by an error; an end without one is resumed too.
            time.sleep(self._reconnect.backoff(1))

    def health(self, service: str = "") -> bool:
        """Whether the gateway (and its broker and database) is SERVING."""
        request = health_pb2.HealthCheckRequest(service=service)
        answer = self._unary(self._health.Check, request)
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

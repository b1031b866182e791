"""The asyncio client: `Client`'s methods as coroutines and async iterators, on grpc.aio.

    async with AsyncClient("127.0.0.1:50051", token="...") as client:
        async for change in client.watch_projects(cursor=saved):
            ...

Same deadlines, retries, request_ids and errors as the sync client (`harvester.calls` and
`harvester.retry` hold what they share).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio
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


class AsyncClient:
    """A client of one gateway for one event loop; close it, or use `async with`."""

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
            aio.secure_channel(self.connection.address, credentials)
            if credentials is not None
            else aio.insecure_channel(self.connection.address)
        )
        self._queue = queue_service_pb2_grpc.QueueServiceStub(self._channel)
        self._projects = project_service_pb2_grpc.ProjectServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._kinds = calls.IdKinds()

    @classmethod
    def from_env(cls) -> AsyncClient:
        """A client configured by HARVESTER_ADDRESS, HARVESTER_TOKEN, HARVESTER_TLS_* ..."""
        return cls(connection=Connection.from_env())

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(
        self,
        method: aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        *,
        repeatable: bool = True,
    ) -> Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(
                    request, timeout=self.connection.deadline, metadata=self.connection.metadata
                )
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if not self._retry.should_retry(error, attempt, repeatable=repeatable):
                    raise error from exc
            await asyncio.sleep(self._retry.backoff(attempt, error))

    async def _follow(
        self, open_stream: Callable[[], aio.UnaryStreamCall[Request, Response]]
    ) -> AsyncIterator[Response]:
        """As `Client._follow`: a server stream, reopened after UNAVAILABLE until it ends."""
        attempt = 0
        while True:
            stream = open_stream()
            try:
                async for message in stream:
                    attempt = 0
                    yield message
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                attempt += 1
                if not self._reconnect.should_retry(error, attempt, repeatable=False):
                    raise error from exc
            finally:
                stream.cancel()
            await asyncio.sleep(self._reconnect.backoff(attempt, error))

    # --- QueueService ---

    async def upload(self, page: int, *, request_id: str | None = None) -> Task:
        """As `Client.upload`."""
        request = calls.upload_request(page, request_id)
        task = (await self._unary(self._queue.Upload, request)).task
        self._kinds.remember(task)
        return task

    async def upload_pages(
        self, first: int, last: int, *, until_known: bool = False, request_id: str | None = None
    ) -> Batch:
        """As `Client.upload_pages`."""
        request = calls.upload_pages_request(first, last, until_known, request_id)
        batch = (await self._unary(self._queue.UploadPages, request)).batch
        self._kinds.remember(batch)
        return batch

    async def task(self, id_: str) -> Task:
        request = queue_service_pb2.GetStatusRequest(id=id_)
        return (await self._unary(self._queue.GetStatus, request)).task

    async def batch(self, id_: str) -> Batch:
        request = queue_service_pb2.GetBatchRequest(id=id_)
        return (await self._unary(self._queue.GetBatch, request)).batch

    async def status(self, id_: str) -> Task | Batch:
        """As `Client.status`."""
        known = self._kinds.known_batch(id_)
        if known is not None:
            return await self.batch(id_) if known else await self.task(id_)
        try:
            return self._kinds.remember(await self.task(id_))
        except NotFound:
            return self._kinds.remember(await self.batch(id_))

    async def watch(self, id_: str) -> AsyncIterator[Task | Batch]:
        """As `Client.watch`; bound it with asyncio.timeout() if you need to."""
        metadata = self.connection.metadata
        if isinstance(await self.status(id_), Batch):
            batch_request = queue_service_pb2.WatchBatchRequest(id=id_)
            async for batch_answer in self._follow(
                lambda: self._queue.WatchBatch(batch_request, metadata=metadata)
            ):
                yield batch_answer.batch
                if calls.is_final(batch_answer.batch):
                    return
        else:
            task_request = queue_service_pb2.WatchStatusRequest(id=id_)
            async for task_answer in self._follow(
                lambda: self._queue.WatchStatus(task_request, metadata=metadata)
            ):
                yield task_answer.task
                if calls.is_final(task_answer.task):
                    return

    # `timeout` as in Client.wait (the API), applied with asyncio.timeout inside.
    async def wait(self, id_: str, timeout: float | None = None) -> Task | Batch:  # noqa: ASYNC109
        """As `Client.wait`."""
        last: Task | Batch | None = None
        try:
            async with asyncio.timeout(timeout):
                async for state in self.watch(id_):
                    last = state
        except TimeoutError:
            pass
        if last is None or not calls.is_final(last):
            raise DeadlineExceeded(f"{id_} has not finished after {timeout} s")
        return last

    async def cancel(self, id_: str) -> Task | Batch:
        """As `Client.cancel`."""
        try:
            if isinstance(await self.status(id_), Batch):
                request = queue_service_pb2.CancelBatchRequest(id=id_)
                return (await self._unary(self._queue.CancelBatch, request)).batch
            task_request = queue_service_pb2.CancelTaskRequest(id=id_)
            return (await self._unary(self._queue.CancelTask, task_request)).task
        except FailedPrecondition:
            now = await self.status(id_)
            if now.status == task_pb2.TASK_STATUS_REVOKED:
                return now
            raise

    async def tasks(
        self,
        *,
        status: TaskStatus.ValueType | None = None,
        batch_id: str = "",
        limit: int | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[Task]:
        """As `Client.tasks`."""
        request = calls.list_tasks_request(status=status, batch_id=batch_id, page_size=page_size)
        given = 0
        while True:
            answer = await self._unary(self._queue.ListTasks, request)
            for task in answer.tasks:
                if limit is not None and given >= limit:
                    return
                given += 1
                yield task
            if not answer.next_page_token:
                return
            request.page_token = answer.next_page_token

    # --- ProjectService ---

    async def list_projects(
        self,
        *,
        is_active: bool | None = None,
        updated_after: datetime.datetime | datetime.date | None = None,
        query: str = "",
        order_by: str = "",
        limit: int | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[Project]:
        """As `Client.list_projects`."""
        request = calls.list_projects_request(
            is_active=is_active,
            updated_after=updated_after,
            query=query,
            order_by=order_by,
            page_size=page_size,
        )
        given = 0
        while True:
            answer = await self._unary(self._projects.ListProjects, request)
            for project in answer.projects:
                if limit is not None and given >= limit:
                    return
                given += 1
                yield project
            if not answer.next_page_token:
                return
            request.page_token = answer.next_page_token

    async def project(self, *, id_: int | None = None, url: str | None = None) -> Project:
        request = (
            project_service_pb2.GetProjectRequest(id=id_)
            if id_ is not None
            else project_service_pb2.GetProjectRequest(url=url or "")
        )
        return (await self._unary(self._projects.GetProject, request)).project

    async def watch_projects(
        self,
        cursor: str | None = None,
        *,
        from_beginning: bool = False,
        is_active: bool | None = None,
    ) -> AsyncIterator[WatchedChange]:
        """As `Client.watch_projects`: every change after `cursor`, reconnecting from the
        last cursor received after UNAVAILABLE or a gateway restart."""
        position = cursor

        def open_stream() -> aio.UnaryStreamCall[
            project_service_pb2.WatchProjectsRequest, project_service_pb2.WatchProjectsResponse
        ]:
            request = calls.watch_projects_request(position, from_beginning, is_active)
            return self._projects.WatchProjects(request, metadata=self.connection.metadata)

        while True:
            async for response in self._follow(open_stream):
                for change in calls.changes_of(response):
                    yield change
                position = response.cursor or position
            # The gateway ends a watch only by an error; an end without one is resumed too.
            await asyncio.sleep(self._reconnect.backoff(1))

    async def health(self, service: str = "") -> bool:
        """As `Client.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        answer = await self._unary(self._health.Check, request)
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

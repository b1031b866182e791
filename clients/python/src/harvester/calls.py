"""What the sync and the asyncio client share: building requests and reading answers.

Both flavours make the same requests and read the same answers; only the waiting differs (a
thread blocks, a coroutine awaits), so everything else lives here once.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from projects.v1 import (
    project_pb2,
    project_service_pb2,
    queue_service_pb2,
    task_pb2,
)

Task = task_pb2.Task
Batch = task_pb2.Batch
Project = project_pb2.Project
TaskStatus = task_pb2.TaskStatus
ChangeType = project_pb2.ChangeType

# The states after which nothing changes any more.
FINAL_STATUSES = frozenset(
    {task_pb2.TASK_STATUS_SUCCESS, task_pb2.TASK_STATUS_FAILURE, task_pb2.TASK_STATUS_REVOKED}
)


def is_final(item: Task | Batch) -> bool:
    return item.status in FINAL_STATUSES


def new_request_id() -> str:
    """An AIP-155 request_id: a retry of the same upload sends the same one, so the gateway
    answers with the task the first try made instead of enqueuing a second."""
    return str(uuid.uuid4())


def upload_request(page: int, request_id: str | None) -> queue_service_pb2.UploadRequest:
    return queue_service_pb2.UploadRequest(page=page, request_id=request_id or new_request_id())


def upload_pages_request(
    first: int, last: int, until_known: bool, request_id: str | None
) -> queue_service_pb2.UploadPagesRequest:
    return queue_service_pb2.UploadPagesRequest(
        first_page=first,
        last_page=last,
        until_known=until_known,
        request_id=request_id or new_request_id(),
    )


def timestamp(moment: datetime.datetime | datetime.date) -> timestamp_pb2.Timestamp:
    """A Timestamp of a datetime (naive ones read as UTC) or of a date's midnight UTC."""
    if not isinstance(moment, datetime.datetime):
        moment = datetime.datetime.combine(moment, datetime.time(), datetime.UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def list_projects_request(
    *,
    is_active: bool | None,
    updated_after: datetime.datetime | datetime.date | None,
    query: str,
    order_by: str,
    page_size: int,
) -> project_service_pb2.ListProjectsRequest:
    request = project_service_pb2.ListProjectsRequest(
        query=query, order_by=order_by, page_size=page_size
    )
    if is_active is not None:
        request.is_active = is_active
    if updated_after is not None:
        request.updated_after.CopyFrom(timestamp(updated_after))
    return request


def list_tasks_request(
    *, status: TaskStatus.ValueType | None, batch_id: str, page_size: int
) -> queue_service_pb2.ListTasksRequest:
    request = queue_service_pb2.ListTasksRequest(batch_id=batch_id, page_size=page_size)
    if status is not None:
        request.status = status
    return request


def watch_projects_request(
    cursor: str | None, from_beginning: bool, is_active: bool | None
) -> project_service_pb2.WatchProjectsRequest:
    request = project_service_pb2.WatchProjectsRequest(
        cursor=cursor or "", from_beginning=from_beginning and not cursor
    )
    if is_active is not None:
        request.is_active = is_active
    return request


@dataclass(frozen=True, slots=True)
class WatchedChange:
    """One project as a harvest created or changed it.

    `cursor` is set on the last change of each message the gateway sent: resume after this
    change by passing it as `watch_projects(cursor=...)`. On the changes before it it is None:
    there is no position between them, so keep the last cursor you saw (resuming from it
    repeats at most the changes of one message).
    """

    project: Project
    change_type: ChangeType.ValueType
    cursor: str | None

    @property
    def created(self) -> bool:
        return self.change_type == project_pb2.CHANGE_TYPE_CREATED


def changes_of(response: project_service_pb2.WatchProjectsResponse) -> Iterator[WatchedChange]:
    """The changes of one WatchProjects message, in commit order, the cursor on the last."""
    last = len(response.changes) - 1
    for index, change in enumerate(response.changes):
        yield WatchedChange(
            project=change.project,
            change_type=change.change_type,
            cursor=response.cursor if index == last else None,
        )


class IdKinds:
    """Which ids are batches: those this client made are known; another is asked for (a task
    first), and remembered."""

    def __init__(self) -> None:
        self._batches: set[str] = set()
        self._tasks: set[str] = set()

    def remember(self, item: Task | Batch) -> Task | Batch:
        (self._batches if isinstance(item, Batch) else self._tasks).add(item.id.lower())
        return item

    def known_batch(self, id_: str) -> bool | None:
        """True for a batch, False for a task, None when not known yet."""
        key = id_.lower()
        if key in self._batches:
            return True
        return False if key in self._tasks else None

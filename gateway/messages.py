"""Protobuf messages made from what the gateway reads: timestamps, dates, projects."""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

from google.protobuf import timestamp_pb2

from gateway.batches import StoredBatch
from gateway.project_store import StoredProject
from projects.v1 import project_pb2, task_pb2

BATCH_STATUS = {
    "PENDING": task_pb2.TASK_STATUS_PENDING,
    "STARTED": task_pb2.TASK_STATUS_STARTED,
    "SUCCESS": task_pb2.TASK_STATUS_SUCCESS,
    "FAILURE": task_pb2.TASK_STATUS_FAILURE,
    "REVOKED": task_pb2.TASK_STATUS_REVOKED,
}

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


@functools.lru_cache(maxsize=1024)
def timestamp_fields(value: dt.datetime) -> dict[str, int]:
    """`value` as a Timestamp's fields, a naive datetime taken as UTC (as FromDatetime does).

    Remembered: the rows one statement stored share its timestamps, so a page of projects
    holds few distinct ones, and their arithmetic was a tenth of the gateway's CPU a row of
    ListProjects (bench/README.md). The dict is shared between callers: read it, copy it into
    a message, never change it.
    """
    # Timestamp.FromDatetime goes through a time tuple and calendar.timegm, a sizeable share of
    # an Upload's own work in the gateway; the datetime's own arithmetic gives the same instant.
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    seconds, micro = divmod((value - _EPOCH) // _MICROSECOND, 1_000_000)
    return {"seconds": seconds, "nanos": micro * 1000}


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(**timestamp_fields(value))


def optional_timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if value is None else timestamp(value)


def project_fields(project: StoredProject) -> dict[str, Any]:
    """A Project message's fields as a dict, nested messages included.

    Responses of many projects are built from these in one constructor: upb then builds each
    nested message in place, where finished Project messages would each be copied into the
    repeated field (bench/README.md, list_projects). upb takes a dict wherever a message goes;
    the generated stubs do not say so, hence the `type: ignore` where these are passed.
    """
    start = project.start_date
    fields: dict[str, Any] = {
        "id": project.id,
        "url": project.url,
        "title": project.title,
        "description": project.description,
        "is_active": project.is_active,
        "create_time": timestamp_fields(project.first_seen_at),
        "update_time": timestamp_fields(project.updated_at),
        "last_seen_time": timestamp_fields(project.last_seen_at),
    }
    if start is not None:
        fields["start_date"] = {"year": start.year, "month": start.month, "day": start.day}
    return fields


def project_message(project: StoredProject) -> project_pb2.Project:
    return project_pb2.Project(**project_fields(project))


def batch_message(batch: StoredBatch) -> task_pb2.Batch:
    status = batch.status
    return task_pb2.Batch(
        id=batch.id,
        status=BATCH_STATUS[status],
        first_page=batch.first_page,
        last_page=batch.last_page,
        until_known=batch.until_known,
        stop_page=batch.stop_page or 0,
        pages_total=batch.pages_total,
        pages_succeeded=batch.pages_succeeded,
        pages_failed=batch.pages_failed,
        pages_cancelled=batch.pages_cancelled,
        totals=task_pb2.BatchTotals(
            found=batch.found, created=batch.created, updated=batch.updated, skipped=batch.skipped
        ),
        error=(batch.error or "") if status == "FAILURE" else "",
        enqueue_time=timestamp(batch.enqueued_at),
        start_time=optional_timestamp(batch.started_at),
        finish_time=optional_timestamp(batch.finished_at),
    )

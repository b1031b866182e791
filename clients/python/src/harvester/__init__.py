"""A typed client of the projects-harvester gateway, sync (`Client`) and asyncio
(`AsyncClient`), and the `harvester` command (`harvester.cli`).

Every call has a deadline (10 s unless told otherwise), is tried again after UNAVAILABLE with
backoff and jitter, and fails with one of `harvester.errors`. Uploads carry a request_id made
here, so a retried upload never enqueues twice.
"""

from harvester.aio import AsyncClient
from harvester.calls import Batch, Project, Task, WatchedChange
from harvester.client import Client
from harvester.connection import Connection
from harvester.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    HarvesterError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from harvester.retry import RetryPolicy

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Batch",
    "Client",
    "Connection",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "HarvesterError",
    "InvalidArgument",
    "NotFound",
    "Project",
    "ResourceExhausted",
    "RetryPolicy",
    "Task",
    "Unauthenticated",
    "Unavailable",
    "WatchedChange",
]

"""The fault suite's ledger: what was accepted, and at the end what was lost or duplicated.

lost = accepted tasks not in SUCCESS or in FAILURE-with-a-reason once all is quiet (an endless
PENDING is lost) + expected links missing from the table; duplicated = rows - distinct links.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from projects.v1 import task_pb2
from tests.support.processes import Gateway
from tests.support.stack import TERMINAL, Stack, get_status, upload

# Filled by the scenarios, printed at the end of the run (see conftest.py).
REPORT: list[str] = []


@dataclass
class Counts:
    accepted: int
    success: int
    failure: int
    lost: int
    duplicated: int
    rows: int

    def line(self) -> str:
        return (
            f"accepted={self.accepted} success={self.success} failure={self.failure} "
            f"lost={self.lost} duplicated={self.duplicated} rows={self.rows}"
        )


@dataclass
class Ledger:
    stack: Stack
    accepted: dict[str, str] = field(default_factory=dict)  # request_id -> task id
    pages: dict[str, int] = field(default_factory=dict)  # request_id -> page
    final: dict[str, task_pb2.Task] = field(default_factory=dict)

    def upload(self, gateway: Gateway, page: int, request_id: str) -> task_pb2.Task:
        task = upload(gateway, page, request_id=request_id)
        self.accepted[request_id] = task.id
        self.pages[request_id] = page
        return task

    def settle(self, gateway: Gateway, timeout: float) -> None:
        """Wait until every accepted task is terminal, or the time is up (what is left is lost)."""
        deadline = time.monotonic() + timeout
        pending = dict(self.accepted)
        while pending and time.monotonic() < deadline:
            for request_id, task_id in list(pending.items()):
                try:
                    task = get_status(gateway, task_id)
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        del pending[request_id]  # an accepted task the gateway forgot: lost
                    continue
                if task.status in TERMINAL:
                    self.final[request_id] = task
                    del pending[request_id]
            time.sleep(0.2)

    def count(self, expected_links: set[str]) -> Counts:
        success = sum(t.status == task_pb2.TASK_STATUS_SUCCESS for t in self.final.values())
        failure = sum(
            t.status == task_pb2.TASK_STATUS_FAILURE and bool(t.error) for t in self.final.values()
        )
        rows, distinct = self.stack.row_counts()
        stored = set(self.stack.projects())
        lost_tasks = len(self.accepted) - success - failure
        return Counts(
            accepted=len(self.accepted),
            success=success,
            failure=failure,
            lost=lost_tasks + len(expected_links - stored),
            duplicated=rows - distinct,
            rows=rows,
        )


def record(scenario: str, did: str, counts: Counts) -> None:
    line = f"{scenario}: {did} -> {counts.line()}"
    REPORT.append(line)
    print(line)


def sample_links(site_url: str, pages: list[int], per_page: int = 10) -> set[str]:
    """The links the sample site lists on `pages` (projects are numbered across pages)."""
    return {
        f"{site_url}/projects/{number}"
        for page in pages
        for number in range((page - 1) * per_page + 1, page * per_page + 1)
    }


def count_cancelled_batch(
    stack: Stack,
    site_url: str,
    tasks: Mapping[int, task_pb2.Task],
    succeeded: Sequence[int],
    revoked: Sequence[int],
) -> tuple[Counts, set[str], set[str]]:
    """A cancelled batch's ledger, its pages' final tasks by page: each is SUCCESS or REVOKED
    (any other is lost), and the table holds exactly the succeeded pages' links. The counts,
    the links stored and the links expected."""
    rows, distinct = stack.row_counts()
    stored = set(stack.projects())
    expected = sample_links(site_url, list(succeeded))
    counts = Counts(
        accepted=len(tasks),
        success=len(succeeded),
        failure=sum(t.status == task_pb2.TASK_STATUS_FAILURE for t in tasks.values()),
        lost=len(tasks) - len(succeeded) - len(revoked) + len(expected - stored),
        duplicated=rows - distinct,
        rows=rows,
    )
    return counts, stored, expected

"""What the gateway answers while a dependency hangs: every RPC's slowest answer against its
bound, the codes it answered with, and health's transitions, timed.

`RpcProbe` calls each RPC over and over on a thread of its own, with a client deadline far past
the bound, so a call that hangs shows as a slow answer or DEADLINE_EXCEEDED instead of being
cut short by the client. Each answer must be OK or UNAVAILABLE with a RetryInfo. The Uploads it
gets accepted go into the scenario's ledger, like any other. `HealthTimeline` polls the health
service and keeps each change of its status with the time it was first seen.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from projects.v1 import project_service_pb2, project_service_pb2_grpc, queue_service_pb2
from tests.faults.ledger import Ledger
from tests.support.processes import Gateway
from tests.support.stack import TEST_TOKEN, rpc_detail

AUTH = (("authorization", f"Bearer {TEST_TOKEN}"),)
# Far past any bound: a call that waits this long has hung.
CLIENT_DEADLINE_SECONDS = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RpcAnswers:
    """One RPC's answers: how many of each code, the slowest, and any improper one."""

    codes: dict[str, int] = field(default_factory=dict)
    slowest: float = 0.0
    improper: list[str] = field(default_factory=list)

    def line(self, name: str, bound: float) -> str:
        codes = ",".join(f"{code}x{count}" for code, count in sorted(self.codes.items()))
        return f"{name} slowest {self.slowest:.2f} s of {bound:g} s ({codes})"


class RpcProbe:
    def __init__(
        self,
        gateway: Gateway,
        ledger: Ledger,
        pages: list[int],
        task_id: str,
        link: str,
        batch_id: str,
    ) -> None:
        """Uploads (and UploadPages) of `pages`, GetStatus of `task_id`, GetProject of the
        project at `link`, GetBatch of `batch_id`."""
        self._batch_id = batch_id
        self._gateway = gateway
        self._ledger = ledger
        self._pages = pages
        self._task_id = task_id
        self._link = link
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: dict[str, RpcAnswers] = {}
        self._threads: list[threading.Thread] = []

    def _calls(self) -> dict[str, Callable[[int], None]]:
        stub, projects = self._gateway.stub, self._gateway.projects
        deadline = CLIENT_DEADLINE_SECONDS

        def upload(n: int) -> None:
            page = self._pages[n % len(self._pages)]
            answer = stub.Upload(
                queue_service_pb2.UploadRequest(page=page), metadata=AUTH, timeout=deadline
            )
            with self._lock:  # accepted: it must run, like any other
                self._ledger.accepted[f"probe-{answer.task.id}"] = answer.task.id
                self._ledger.pages[f"probe-{answer.task.id}"] = page

        def upload_request_id(n: int) -> None:
            page = self._pages[n % len(self._pages)]
            request_id = f"probe-{uuid.uuid4().hex[:12]}"
            answer = stub.Upload(
                queue_service_pb2.UploadRequest(page=page, request_id=request_id),
                metadata=AUTH,
                timeout=deadline,
            )
            with self._lock:
                self._ledger.accepted[request_id] = answer.task.id
                self._ledger.pages[request_id] = page

        def get_status(_n: int) -> None:
            stub.GetStatus(
                queue_service_pb2.GetStatusRequest(id=self._task_id),
                metadata=AUTH,
                timeout=deadline,
            )

        def list_tasks(_n: int) -> None:
            stub.ListTasks(
                queue_service_pb2.ListTasksRequest(page_size=5), metadata=AUTH, timeout=deadline
            )

        def list_projects(_n: int) -> None:
            projects.ListProjects(
                project_service_pb2.ListProjectsRequest(page_size=5),
                metadata=AUTH,
                timeout=deadline,
            )

        def get_project(_n: int) -> None:
            projects.GetProject(
                project_service_pb2.GetProjectRequest(url=self._link),
                metadata=AUTH,
                timeout=deadline,
            )

        def upload_pages(n: int) -> None:
            page = self._pages[n % len(self._pages)]
            stub.UploadPages(
                queue_service_pb2.UploadPagesRequest(first_page=page, last_page=page),
                metadata=AUTH,
                timeout=deadline,
            )

        def get_batch(_n: int) -> None:
            stub.GetBatch(
                queue_service_pb2.GetBatchRequest(id=self._batch_id),
                metadata=AUTH,
                timeout=deadline,
            )

        return {
            "Upload": upload,
            "UploadPages": upload_pages,
            "GetBatch": get_batch,
            "Upload(request_id)": upload_request_id,
            "GetStatus": get_status,
            "ListTasks": list_tasks,
            "ListProjects": list_projects,
            "GetProject": get_project,
        }

    def _loop(self, name: str, call: Callable[[int], None]) -> None:
        answers = self.answers[name]
        n = 0
        while not self._stop.is_set():
            started = time.monotonic()
            code = "OK"
            try:
                call(n)
            except grpc.RpcError as error:
                code = error.code().name
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    answers.improper.append(f"{code}: {error.details()}")
                else:
                    try:
                        rpc_detail(error, error_details_pb2.RetryInfo)
                    except AssertionError:
                        answers.improper.append(f"UNAVAILABLE without RetryInfo: {error.details()}")
            elapsed = time.monotonic() - started
            with self._lock:
                answers.codes[code] = answers.codes.get(code, 0) + 1
                answers.slowest = max(answers.slowest, elapsed)
            n += 1
            self._stop.wait(0.05)

    def start(self) -> None:
        for name, call in self._calls().items():
            self.answers[name] = RpcAnswers()
            thread = threading.Thread(target=self._loop, args=(name, call), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> dict[str, RpcAnswers]:
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_DEADLINE_SECONDS + 5)
        return self.answers


class HealthTimeline:
    """Health's status every POLL_SECONDS, kept as its changes: [(monotonic time, status)]."""

    POLL_SECONDS = 0.05

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self.changes: list[tuple[float, int]] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = int(self._stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
            except grpc.RpcError:
                status = -1  # health itself did not answer: never expected
            self.slowest = max(self.slowest, time.monotonic() - started)
            if not self.changes or self.changes[-1][1] != status:
                self.changes.append((started, status))
            self._stop.wait(self.POLL_SECONDS)

    def start(self) -> HealthTimeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._channel.close()

    def first(self, status: int, after: float) -> float | None:
        """Seconds from `after` until health was first seen at `status` (None: never)."""
        for when, seen in self.changes:
            if seen == status and when >= after:
                return when - after
        # Already at `status` when `after` came (and it stayed so).
        before = [seen for when, seen in self.changes if when < after]
        return 0.0 if before and before[-1] == status else None

    def settled(self, status: int, after: float) -> float | None:
        """Seconds from `after` until health reached `status` for good (None: it is not)."""
        if not self.changes or self.changes[-1][1] != status:
            return None
        return max(0.0, self.changes[-1][0] - after)

    def statuses_since(self, after: float) -> set[int]:
        before = [seen for when, seen in self.changes if when < after]
        return {seen for when, seen in self.changes if when >= after} | set(before[-1:])


class WatchThroughAStall:
    """A WatchProjects stream open through a stall: when and how the gateway ended it."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stream = project_service_pb2_grpc.ProjectServiceStub(self._channel).WatchProjects(
            project_service_pb2.WatchProjectsRequest(from_beginning=True), metadata=AUTH
        )
        self.responses = 0
        self.ended_at: float | None = None  # time.time()
        self.ended: tuple[grpc.StatusCode, str] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        try:
            for _response in self._stream:
                self.responses += 1
        except grpc.RpcError as error:
            self.ended = (error.code(), error.details() or "")
        self.ended_at = time.time()

    def start(self) -> WatchThroughAStall:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stream.cancel()  # type: ignore[no-untyped-call]
        self._thread.join(5)
        self._channel.close()

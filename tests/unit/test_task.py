"""worker.task.run_harvest with a fake task (request, backend, retry, runtime) and a fake harvest.

What is decided here and not in the harvest itself: when a task is poison (its worker died
too often), when a failed try is retried or given up, and that a SUCCESS another delivery
already stored stands.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest

from core.events import TaskChanged
from core.ledger import Finished, Outcome
from core.settings import Settings
from projects.v1 import task_pb2
from tests.unit.helpers import clear_settings_environment
from worker import task as task_module
from worker.errors import PermanentError, RetryableError
from worker.politeness import TurnNotGiven
from worker.runtime import WorkerRuntime
from worker.store import TaskStart
from worker.task import MAX_WORKER_DEATHS, HarvestTask, run_harvest

TASK_ID = "5f0c7a52-2d0e-4b7a-9a4e-0d9b6c1e8f31"
PAGE = 3
MAX_TRIES = 4
SOFT_LIMIT = 120.0
STORED = {"page": PAGE, "found": 10, "created": 0, "updated": 0, "skipped": 0}


class Retried(Exception):
    """What the fake task's retry() returns for run_harvest to raise, as Celery's Retry."""


@dataclass
class FakeBackend:
    meta: dict[str, Any] = field(default_factory=lambda: {"status": "PENDING", "result": None})
    asked: list[str] = field(default_factory=list)

    def get_task_meta(self, task_id: str) -> dict[str, Any]:
        self.asked.append(task_id)
        return self.meta


class FakeEvents:
    def __init__(self, ran: list[Any]) -> None:
        self._ran = ran

    async def publish(self, event: Any) -> None:
        self._ran.append(("publish", event))


class FakeRuntime:
    """What run_harvest uses of a WorkerRuntime: settings, engine, events, and run() for the
    record's writes (a start, an end, record_retry, mark_published: this fake and the
    `harvest` fixture fake them, each adding a tuple naming it to `ran`, as publish does)."""

    def __init__(self, settings: Settings, deliveries: int = 1) -> None:
        self.settings = settings
        self.engine = object()
        self.ran: list[Any] = []
        self.events = FakeEvents(self.ran)
        self.deliveries = deliveries
        # The records' loop, engine and events: the same fakes, so `ran` holds every write.
        self.records = self

    def run(self, work: Any, timeout: float | None = None) -> Any:
        return asyncio.run(work)

    async def start(self, task_id: str) -> TaskStart:
        """As TaskRecords.start: the record's start, then its event."""
        self.ran.append(("start_task",))
        await self.events.publish(TaskChanged(task_id))
        return TaskStart(self.deliveries, self.cancelled, self.finished)

    async def end(self, task_id: str, outcome: Outcome) -> Finished:
        """As TaskRecords.end: the record's final state, then its event."""
        self.ran.append(("finish_task", outcome))
        await self.events.publish(TaskChanged(task_id))
        return Finished(counted=True)

    cancelled = False
    finished = False

    def did(self, name: str) -> list[Any]:
        return [work for work in self.ran if work[0] == name]

    def outcomes(self) -> list[Outcome]:
        return [work[1] for work in self.did("finish_task")]


class FakeTask:
    def __init__(self, runtime: FakeRuntime, *, retries: int = 0, deliveries: int | None = 1):
        self.request = SimpleNamespace(id=TASK_ID, retries=retries)
        if deliveries is not None:  # as the prerun hook sets it
            self.request.start = TaskStart(deliveries)
        self.backend = FakeBackend()
        self.runtime = runtime
        self.retry_calls: list[dict[str, Any]] = []

    def retry(self, **kwargs: Any) -> Retried:
        self.retry_calls.append(kwargs)
        return Retried()

    def succeeded_elsewhere(self, result: Any = STORED) -> None:
        self.backend.meta = {"status": "SUCCESS", "result": result}


@dataclass
class FakeHarvest:
    """Stands in for worker.task.harvest: raises `error`, or returns `result`."""

    error: Exception | None = None
    result: task_pb2.UploadResult = field(
        default_factory=lambda: task_pb2.UploadResult(page=PAGE, found=10, created=7, updated=2)
    )
    calls: list[tuple[Any, int, float]] = field(default_factory=list)

    def __call__(
        self, runtime: Any, page: int, deadline: float, task_id: str
    ) -> task_pb2.UploadResult:
        self.calls.append((runtime, page, deadline))
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    clear_settings_environment(monkeypatch)
    return Settings(
        _env_file=None,
        database_url="sqlite+aiosqlite:///unused.db",
        source_url="http://127.0.0.1:9/projects?page={page}",
        retry_max_tries=MAX_TRIES,
        retry_base_delay_seconds=2.0,
        retry_max_delay_seconds=30.0,
        retry_after_cap_seconds=45.0,
        task_soft_time_limit_seconds=SOFT_LIMIT,
        task_time_limit_seconds=SOFT_LIMIT + 30,
    )


@pytest.fixture
def runtime(settings: Settings) -> FakeRuntime:
    return FakeRuntime(settings)


@pytest.fixture
def harvest(monkeypatch: pytest.MonkeyPatch, runtime: FakeRuntime) -> FakeHarvest:
    fake = FakeHarvest()
    monkeypatch.setattr(task_module, "harvest", fake)

    async def record_retry(engine: Any, task_id: str, error: str) -> None:
        runtime.ran.append(("record_retry",))

    monkeypatch.setattr(task_module, "record_retry", record_retry)
    return fake


def run(task: FakeTask, turns_missed: int = 0) -> dict[str, Any]:
    return run_harvest(cast(HarvestTask, task), PAGE, turns_missed)


# --- a try that succeeds ------------------------------------------------------------------------


def test_a_harvest_returns_its_result_with_every_field(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    task = FakeTask(runtime)
    before = time.monotonic()

    result = run(task)

    # Zeros included: the gateway reads every field back.
    assert result == {
        "page": PAGE,
        "found": 10,
        "created": 7,
        "updated": 2,
        "skipped": 0,
        "not_modified": False,
    }
    ((given_runtime, page, deadline),) = harvest.calls
    assert (given_runtime, page) == (runtime, PAGE)
    assert before + SOFT_LIMIT <= deadline <= time.monotonic() + SOFT_LIMIT
    assert task.retry_calls == []
    assert task.backend.asked == []  # nothing failed: the backend is not asked


# --- the poison rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retries", "deliveries"),
    [
        (0, 1),  # a first try
        (0, MAX_WORKER_DEATHS),  # MAX_WORKER_DEATHS - 1 deaths
        (2, 3),  # a third try after two retries
        (2, 3 + MAX_WORKER_DEATHS - 1),
    ],
)
def test_fewer_worker_deaths_than_the_limit_still_harvest(
    runtime: FakeRuntime, harvest: FakeHarvest, retries: int, deliveries: int
) -> None:
    task = FakeTask(runtime, retries=retries, deliveries=deliveries)

    assert run(task)["found"] == 10
    assert len(harvest.calls) == 1


@pytest.mark.parametrize(
    ("retries", "deliveries", "deaths"),
    [
        (0, 1 + MAX_WORKER_DEATHS, MAX_WORKER_DEATHS),
        (2, 3 + MAX_WORKER_DEATHS, MAX_WORKER_DEATHS),
        (1, 2 + MAX_WORKER_DEATHS + 5, MAX_WORKER_DEATHS + 5),
    ],
)
def test_a_task_whose_worker_died_max_worker_deaths_times_is_poison(
    runtime: FakeRuntime, harvest: FakeHarvest, retries: int, deliveries: int, deaths: int
) -> None:
    task = FakeTask(runtime, retries=retries, deliveries=deliveries)

    with pytest.raises(PermanentError, match=rf"page {PAGE}: the worker .* died {deaths} times"):
        run(task)

    assert harvest.calls == []  # not tried again
    assert task.retry_calls == []
    assert task.backend.asked == [TASK_ID]


def test_a_poison_task_another_delivery_finished_returns_that_result(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    task = FakeTask(runtime, deliveries=1 + MAX_WORKER_DEATHS)
    task.succeeded_elsewhere()

    assert run(task) == STORED
    assert harvest.calls == []


def test_deliveries_the_prerun_hook_could_not_record_are_counted_here(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    runtime.deliveries = 1 + MAX_WORKER_DEATHS
    task = FakeTask(runtime, deliveries=None)

    with pytest.raises(PermanentError, match=f"died {MAX_WORKER_DEATHS} times"):
        run(task)

    assert runtime.did("start_task") == [("start_task",)]


def test_deliveries_recorded_by_the_prerun_hook_are_not_recorded_again(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    run(FakeTask(runtime, deliveries=1))

    assert runtime.did("start_task") == []


# --- a task that found no turn on the source ----------------------------------------------------


def test_a_task_without_a_turn_goes_back_to_the_queue_without_using_a_try(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    harvest.error = TurnNotGiven("no turn on site within 120 s")
    # The last try, by the policy's count: a RetryableError here would give up.
    task = FakeTask(runtime, retries=MAX_TRIES - 1 + 2, deliveries=MAX_TRIES + 2)

    with pytest.raises(Retried):
        run(task, turns_missed=2)

    (call,) = task.retry_calls
    assert call["countdown"] == 0 and call["max_retries"] is None
    assert call["kwargs"] == {"turns_missed": 3}
    assert runtime.did("record_retry") == []  # no failed try to record
    assert runtime.outcomes() == []


def test_turns_missed_are_not_tries(runtime: FakeRuntime, harvest: FakeHarvest) -> None:
    harvest.error = RetryableError("503 from the source")
    # Celery counts MAX_TRIES retries, two of which were turns missed: two tries are left.
    task = FakeTask(runtime, retries=MAX_TRIES, deliveries=MAX_TRIES + 1)

    with pytest.raises(Retried):
        run(task, turns_missed=2)
    assert runtime.outcomes() == []

    # Without the turns missed, the same count is the last try: it gives up.
    task = FakeTask(runtime, retries=MAX_TRIES - 1, deliveries=MAX_TRIES)
    with pytest.raises(PermanentError, match=f"after {MAX_TRIES} tries"):
        run(task)


# --- a try that fails ---------------------------------------------------------------------------


def test_a_retryable_failure_with_tries_left_is_retried_with_backoff(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    error = RetryableError("503 from the source")
    harvest.error = error
    task = FakeTask(runtime, retries=2, deliveries=3)

    with pytest.raises(Retried) as caught:
        run(task)

    (call,) = task.retry_calls
    assert call["exc"] is error
    assert call["max_retries"] is None  # the policy decides, not Celery's own counter
    # The third failed try: a step of 2 * 2**2 = 8 s, half of it fixed, half random.
    assert 4.0 <= call["countdown"] <= 8.0
    assert caught.value.__cause__ is error
    assert task.backend.asked == [TASK_ID]


def test_the_source_s_retry_after_sets_the_delay_up_to_the_cap(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    harvest.error = RetryableError("429 from the source", retry_after=7.0)
    task = FakeTask(runtime)
    with pytest.raises(Retried):
        run(task)

    harvest.error = RetryableError("429 from the source", retry_after=600.0)
    with pytest.raises(Retried):
        run(task)

    assert [call["countdown"] for call in task.retry_calls] == [7.0, 45.0]


def test_a_retryable_failure_of_the_last_try_gives_up_saying_how_often(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    error = RetryableError("503 from the source")
    harvest.error = error
    task = FakeTask(runtime, retries=MAX_TRIES - 1, deliveries=MAX_TRIES)

    with pytest.raises(PermanentError) as caught:
        run(task)

    assert str(caught.value) == (
        f"gave up on page {PAGE} after {MAX_TRIES} tries: 503 from the source"
    )
    assert caught.value.__cause__ is error
    assert task.retry_calls == []


def test_a_permanent_failure_is_raised_as_it_is(runtime: FakeRuntime, harvest: FakeHarvest) -> None:
    error = PermanentError("404 from the source")
    harvest.error = error
    task = FakeTask(runtime)

    with pytest.raises(PermanentError) as caught:
        run(task)

    assert caught.value is error
    assert task.retry_calls == []
    assert task.backend.asked == [TASK_ID]


# --- succeeded meanwhile ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retries"),
    [
        (RetryableError("503 from the source"), 0),  # would be retried
        (RetryableError("503 from the source"), MAX_TRIES - 1),  # would give up
        (PermanentError("404 from the source"), 0),  # would fail
    ],
)
def test_a_failed_delivery_of_a_task_another_delivery_finished_returns_that_result(
    runtime: FakeRuntime, harvest: FakeHarvest, error: Exception, retries: int
) -> None:
    # A copy that outlived its visibility timeout finished while this one failed.
    harvest.error = error
    task = FakeTask(runtime, retries=retries, deliveries=retries + 1)
    task.succeeded_elsewhere()

    assert run(task) == STORED
    assert task.retry_calls == []
    assert task.backend.asked == [TASK_ID]


@pytest.mark.parametrize(
    "meta",
    [
        {"status": "PENDING", "result": None},
        {"status": "STARTED", "result": {"pid": 4242}},
        {"status": "RETRY", "result": STORED},  # not a success, whatever the result looks like
        {"status": "FAILURE", "result": STORED},
        {"status": "SUCCESS", "result": None},  # a success without a result to return
        {"status": "SUCCESS", "result": "done"},
    ],
)
def test_anything_but_a_stored_success_leaves_the_failure_as_it_is(
    runtime: FakeRuntime, harvest: FakeHarvest, meta: dict[str, Any]
) -> None:
    harvest.error = RetryableError("503 from the source")
    task = FakeTask(runtime)
    task.backend.meta = meta

    with pytest.raises(Retried):
        run(task)

    assert len(task.retry_calls) == 1


# --- the runtime comes from the task's base class -----------------------------------------------


def test_a_task_without_an_attached_runtime_says_it_needs_a_worker() -> None:
    task = HarvestTask()

    with pytest.raises(RuntimeError, match="not started: run the task in a worker"):
        _ = task.runtime


def test_an_attached_runtime_is_the_task_s_until_detached(runtime: FakeRuntime) -> None:
    task = HarvestTask()
    attached = cast(WorkerRuntime, runtime)

    task.attach(attached)
    assert task.runtime is attached
    assert task.detach() is attached

    assert task.detach() is None
    with pytest.raises(RuntimeError):
        _ = task.runtime


# --- what the record is told ------------------------------------------------------------------


def test_a_success_is_recorded_once_with_its_counts(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    run(FakeTask(runtime))

    assert runtime.outcomes() == [
        Outcome("SUCCESS", found=10, created=7, updated=2, skipped=0, not_modified=False)
    ]
    assert [work[1].task_id for work in runtime.did("publish")] == [TASK_ID]


def test_a_permanent_failure_is_recorded_saying_why(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    harvest.error = PermanentError("source answered 404")

    with pytest.raises(PermanentError):
        run(FakeTask(runtime))

    assert runtime.outcomes() == [Outcome("FAILURE", error="source answered 404")]


def test_an_error_nothing_expects_is_recorded_as_a_failure_and_raised(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    error = KeyError("title")
    harvest.error = error

    with pytest.raises(KeyError) as caught:
        run(FakeTask(runtime))

    assert caught.value is error  # Celery logs and stores it as it is
    (outcome,) = runtime.outcomes()
    assert outcome.status == "FAILURE"
    assert outcome.error == (
        f"page {PAGE} failed unexpectedly (KeyError: 'title'); see the worker's log"
    )


def test_a_retry_is_recorded_and_nothing_ends(runtime: FakeRuntime, harvest: FakeHarvest) -> None:
    harvest.error = RetryableError("503")

    with pytest.raises(Retried):
        run(FakeTask(runtime))

    assert runtime.did("record_retry") == [("record_retry",)]
    assert runtime.outcomes() == []


def test_a_task_cancelled_before_it_started_is_revoked_and_not_harvested(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    runtime.cancelled = True

    run(FakeTask(runtime, deliveries=None))

    assert harvest.calls == []
    assert runtime.outcomes() == [Outcome("REVOKED", error="cancelled")]


def test_a_task_without_a_record_is_not_run(runtime: FakeRuntime, harvest: FakeHarvest) -> None:
    # Its publish was reported failed and its record dropped, yet the message got through.
    runtime.deliveries = 0

    result = run(FakeTask(runtime, deliveries=None))

    assert harvest.calls == []
    assert runtime.outcomes() == []
    assert result["found"] == 0 and result["created"] == 0


def test_a_task_that_ended_already_is_not_run_again(
    runtime: FakeRuntime, harvest: FakeHarvest
) -> None:
    runtime.finished = True

    run(FakeTask(runtime, deliveries=None))

    assert harvest.calls == []
    assert runtime.outcomes() == []

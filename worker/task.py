"""The harvest task, thin by design: fetch -> parse -> store -> result.

The result is the proto's own `UploadResult`, sent as its JSON form, so the gateway reads it
back into the same message and no dict mirrors the contract by hand.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from typing import Any

from celery import Celery, Task, signals
from google.protobuf import json_format

from core import logs, tracing
from core.celery_config import HARVEST_TASK_NAME
from core.events import ProjectsChanged, TaskChanged
from core.gc_tuning import collector_paused
from core.ledger import Finished, Outcome
from projects.v1 import task_pb2
from worker import failpoints, metrics
from worker.errors import Cancelled, PermanentError, RetryableError
from worker.fetch import fetch_page
from worker.parse import ParsedPage, parse_listing
from worker.retry import RetryPolicy
from worker.runtime import TaskRecords, WorkerRuntime
from worker.store import (
    StoreCounts,
    TaskStart,
    cancel_requested,
    finish_task,
    mark_published,
    record_retry,
    store_projects,
)

log = logging.getLogger(__name__)

# Deliveries beyond the tries the retry policy accounts for: each one means the process that
# ran the task died (a crash, SIGKILL, out of memory). Past this many, the task is poison. A
# crash also charges the tasks that shared the process, hence more than one.
MAX_WORKER_DEATHS = 3


async def _fetch_parse_store(
    runtime: WorkerRuntime, page: int, task_id: str
) -> tuple[ParsedPage, StoreCounts]:
    """The page's work, all of it on the process's event loop.

    The parse runs on the loop too, between the awaits: only one thread of a process runs
    Python at a time anyway, and a parse in the task's own thread made that thread, the loop
    and Celery's threads pass the GIL back and forth (slower, and more CPU per page: see
    bench/README.md). It holds up the loop's other I/O for the length of one parse.
    """
    # This runs in an asyncio task of its own on the runtime's loop: its own log context.
    logs.task_context(task_id, page)
    settings = runtime.settings
    with metrics.FETCH_SECONDS.time():
        fetched = await fetch_page(runtime.http, settings.page_url(page), runtime.fetch_limits)
    metrics.FETCHED_BYTES.inc(len(fetched.body))
    with (
        tracing.tracer().start_as_current_span("parse page") as span,
        collector_paused(),
        metrics.PARSE_SECONDS.time(),
    ):
        parsed = parse_listing(
            fetched.body,
            fetched.url,
            settings.source_profile,
            fetched.encoding,
            settings.source_parser,
        )
        span.set_attributes(
            {
                tracing.PAGE: page,
                tracing.ITEMS_FOUND: len(parsed.items),
                tracing.ITEMS_SKIPPED: parsed.skipped,
            }
        )
    # The checkpoint of a cancel: after the slow part, before anything is stored.
    if await cancel_requested(runtime.engine, task_id):
        raise Cancelled(f"page {page} was cancelled before it stored")
    with (
        tracing.tracer().start_as_current_span("store projects") as span,
        metrics.STORE_SECONDS.time(),
    ):
        counts = await store_projects(runtime.engine, parsed.items, settings.upsert_batch_size)
        span.set_attributes(
            {
                tracing.PAGE: page,
                tracing.PROJECTS_CREATED: counts.created,
                tracing.PROJECTS_UPDATED: counts.updated,
            }
        )
    if counts.revision:
        await runtime.events.publish(ProjectsChanged(counts.revision))
    return parsed, counts


def harvest(
    runtime: WorkerRuntime, page: int, deadline: float, task_id: str
) -> task_pb2.UploadResult:
    settings = runtime.settings

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RetryableError(
                f"page {page} took longer than TASK_SOFT_TIME_LIMIT_SECONDS "
                f"({settings.task_soft_time_limit_seconds:g} s)"
            )
        return left

    failpoints.hit(settings.failpoints, "before_fetch", page, settings.data_dir)
    try:
        parsed, counts = runtime.run(
            tracing.on_loop(_fetch_parse_store(runtime, page, task_id)), remaining()
        )
    except concurrent.futures.TimeoutError:
        remaining()  # raises the soft-limit error
        raise
    failpoints.hit(settings.failpoints, "after_store", page, settings.data_dir)
    result = task_pb2.UploadResult(
        page=page,
        found=len(parsed.items),
        created=counts.created,
        updated=counts.updated,
        skipped=parsed.skipped + counts.unstorable,
    )
    metrics.page_counted(
        found=result.found, skipped=result.skipped, created=result.created, updated=result.updated
    )
    return result


def succeeded_meanwhile(task: Task[Any, Any], page: int) -> dict[str, Any] | None:
    """The stored result if another delivery of this task already succeeded, else None.

    A copy of the task that outlived its visibility timeout may have finished while this one
    failed; that SUCCESS stands rather than being turned back into RETRY or FAILURE.
    """
    meta = task.backend.get_task_meta(str(task.request.id))
    result = meta.get("result")
    if meta.get("status") != "SUCCESS" or not isinstance(result, dict):
        return None
    log.info("page %d: this delivery failed, but another one already succeeded", page)
    return result


class HarvestTask(Task):  # type: ignore[type-arg]
    """The harvest task's base class: it holds the worker process's runtime.

    `worker.app` attaches the runtime when the worker process starts and detaches it at
    shutdown; a task run outside a started worker fails saying so instead of building one.
    """

    _runtime: WorkerRuntime | None = None

    @property
    def runtime(self) -> WorkerRuntime:
        if self._runtime is None:
            raise RuntimeError("the worker runtime is not started: run the task in a worker")
        return self._runtime

    def attach(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime

    def detach(self) -> WorkerRuntime | None:
        runtime, self._runtime = self._runtime, None
        return runtime


# A task's state changes: each is recorded and then said (an event for its watchers) in one
# visit to the records' loop (worker.runtime.TaskRecords), not two; starts are its own.


async def _retry_and_say(records: TaskRecords, task_id: str, error: str) -> None:
    batch_id = await record_retry(records.engine, task_id, error)
    await records.events.publish(TaskChanged(task_id, batch_id))


async def _end_and_say(
    records: TaskRecords, task_id: str, outcome: Outcome, window: int
) -> Finished:
    finished = await finish_task(records.engine, task_id, outcome, window)
    await records.events.publish(TaskChanged(task_id, finished.batch_id))
    return finished


def _ended(task: HarvestTask, outcome: Outcome) -> None:
    """Record the task's final state (counted once for its batch) and say so; publish the pages
    an "until known" batch enqueued as it did."""
    runtime = task.runtime
    records = runtime.records
    window = runtime.settings.until_known_window
    finished = records.run(_end_and_say(records, str(task.request.id), outcome, window))
    for new in finished.new_tasks:
        task.app.send_task(HARVEST_TASK_NAME, args=[new.page], task_id=new.id)
    if finished.new_tasks:
        records.run(mark_published(records.engine, [new.id for new in finished.new_tasks]))
    metrics.task_ended(outcome.status.lower())


def _ended_or_retry(task: HarvestTask, outcome: Outcome) -> None:
    """`_ended`, and when the record cannot be written now, a try later (which ends the same
    way, and writes it then): a final state must reach the record, or its batch never ends."""
    try:
        _ended(task, outcome)
    except RetryableError as exc:
        log.warning("could not record task %s's end (%s); trying again", task.request.id, exc)
        raise task.retry(exc=exc, countdown=1.0, max_retries=None) from exc


def _result(result: task_pb2.UploadResult) -> dict[str, Any]:
    return json_format.MessageToDict(
        result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def run_harvest(task: HarvestTask, page: int) -> dict[str, Any]:
    started = time.monotonic()
    runtime = task.runtime
    settings = runtime.settings
    policy = RetryPolicy.from_settings(settings)
    tries_done = task.request.retries
    task_id = str(task.request.id)
    logs.task_context(task_id, page)
    tracing.set_attributes({tracing.PAGE: page, tracing.TRY: tries_done + 1})
    try:
        start: TaskStart | None = getattr(task.request, "start", None)
        if start is None:  # the prerun hook could not reach the database: try again here
            start = runtime.records.run(runtime.records.start(task_id))
        if start.finished:
            log.info("page %d: task %s has ended already (cancelled); not run", page, task_id)
            return _result(task_pb2.UploadResult(page=page))
        if start.cancelled:
            raise Cancelled(f"page {page} was cancelled before it started")
        deaths = start.deliveries - (tries_done + 1)
        if deaths >= MAX_WORKER_DEATHS:
            raise PermanentError(
                f"gave up on page {page}: the worker process running it died {deaths} times"
            )
        result = harvest(runtime, page, started + settings.task_soft_time_limit_seconds, task_id)
        _ended(
            task,
            Outcome(
                "SUCCESS",
                found=result.found,
                created=result.created,
                updated=result.updated,
                skipped=result.skipped,
            ),
        )
    except Cancelled as exc:
        log.info("%s", exc)
        _ended_or_retry(task, Outcome("REVOKED", error="cancelled"))
        return _result(task_pb2.UploadResult(page=page))
    except PermanentError as exc:
        if (done := succeeded_meanwhile(task, page)) is not None:
            return done
        _ended_or_retry(task, Outcome("FAILURE", error=str(exc)))
        raise
    except RetryableError as exc:
        if (done := succeeded_meanwhile(task, page)) is not None:
            return done
        tries = tries_done + 1
        if not policy.can_retry(tries):
            error = PermanentError(f"gave up on page {page} after {tries} tries: {exc}")
            _ended_or_retry(task, Outcome("FAILURE", error=str(error)))
            raise error from exc
        delay = policy.delay(tries, exc.retry_after)
        log.warning("page %d, try %d failed (%s); retrying in %.1f s", page, tries, exc, delay)
        _retrying(task, str(exc))
        raise task.retry(exc=exc, countdown=delay, max_retries=None) from exc
    log.info(
        "page %d: found %d, created %d, updated %d, skipped %d",
        page,
        result.found,
        result.created,
        result.updated,
        result.skipped,
    )
    return _result(result)


def _retrying(task: HarvestTask, error: str) -> None:
    metrics.task_ended(metrics.RETRY)
    records = task.runtime.records
    # When the record cannot be written, the retry goes ahead all the same; its status shows
    # in Celery's result backend meanwhile.
    with contextlib.suppress(RetryableError):
        records.run(_retry_and_say(records, str(task.request.id), error))


def register(app: Celery) -> HarvestTask:
    # `throws`: a PermanentError is an expected outcome, logged without a traceback.
    @app.task(bind=True, base=HarvestTask, name=HARVEST_TASK_NAME, throws=(PermanentError,))
    def harvest_page(self: HarvestTask, page: int) -> dict[str, Any]:
        return run_harvest(self, page)

    @signals.task_prerun.connect(sender=harvest_page, weak=False)
    def record_delivery(task: HarvestTask, task_id: str, **_: Any) -> None:
        # Runs before Celery stores STARTED, so a task seen STARTED always has its start time.
        start = task.runtime.records.run(task.runtime.records.start(task_id))
        # Celery's request Context takes any attribute; the task body reads this one back.
        task.request.start = start  # type: ignore[attr-defined]

    return harvest_page

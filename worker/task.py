"""The harvest task, thin by design: fetch -> parse -> store -> result.

The result is the proto's own `UploadResult`, sent as its JSON form, so the gateway reads it
back into the same message and no dict mirrors the contract by hand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from typing import Any, NoReturn

from celery import Celery, Task, signals
from celery.exceptions import Reject
from google.protobuf import json_format

from core import logs, tracing
from core.celery_config import HARVEST_TASK_NAME
from core.events import ProjectsChanged, TaskChanged, record_json
from core.gc_tuning import collector_paused
from core.ledger import Outcome
from projects.v1 import task_pb2
from worker import failpoints, metrics
from worker.errors import Cancelled, PermanentError, RetryableError
from worker.fetch import Validators
from worker.parse import parse_listing
from worker.politeness import TurnNotGiven
from worker.retry import RetryPolicy
from worker.runtime import TaskRecords, WorkerRuntime
from worker.store import (
    TaskStart,
    cancel_requested,
    load_page_memo,
    mark_published,
    record_retry,
    refresh_seen,
    remember_page,
    store_projects,
)

log = logging.getLogger(__name__)

# Deliveries beyond the tries the retry policy accounts for: each one means the process that
# ran the task died (a crash, SIGKILL, out of memory). Past this many, the task is poison. A
# crash also charges the tasks that shared the process, hence more than one.
MAX_WORKER_DEATHS = 3


async def _fetch_parse_store(
    runtime: WorkerRuntime, page: int, task_id: str, limit: asyncio.Timeout
) -> task_pb2.UploadResult:
    """The page's work, all of it on the process's event loop, within `limit` (the soft time
    limit, whose clock stops while the task waits for its turn on the source).

    The parse runs on the loop too, between the awaits: only one thread of a process runs
    Python at a time anyway, and a parse in the task's own thread made that thread, the loop
    and Celery's threads pass the GIL back and forth (slower, and more CPU per page: see
    bench/README.md). It holds up the loop's other I/O for the length of one parse.
    """
    settings = runtime.settings
    engine = runtime.engine
    url = settings.page_url(page)
    memo = await load_page_memo(engine, url)
    validators = Validators(memo.etag, memo.last_modified) if memo else None
    # No database connection is held from here to the store: the wait for a turn may be long.
    fetched = await runtime.source.fetch(
        url, validators, limit=limit, max_wait=settings.task_soft_time_limit_seconds
    )
    metrics.FETCHED_BYTES.inc(len(fetched.body))
    if fetched.not_modified and memo is not None:
        # The page lists what it listed last time: those projects were seen again, no more.
        if await cancel_requested(engine, task_id):
            raise Cancelled(f"page {page} was cancelled before it stored")
        await refresh_seen(engine, memo.links, settings.upsert_batch_size)
        return task_pb2.UploadResult(page=page, found=len(memo.links), not_modified=True)
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
    if await cancel_requested(engine, task_id):
        raise Cancelled(f"page {page} was cancelled before it stored")
    with (
        tracing.tracer().start_as_current_span("store projects") as span,
        metrics.STORE_SECONDS.time(),
    ):
        counts = await store_projects(engine, parsed.items, settings.upsert_batch_size)
        span.set_attributes(
            {
                tracing.PAGE: page,
                tracing.PROJECTS_CREATED: counts.created,
                tracing.PROJECTS_UPDATED: counts.updated,
            }
        )
    # After the store: a memo never promises rows that were not stored.
    fresh = fetched.validators
    if memo is not None or fresh.etag or fresh.last_modified:
        # (With neither, there is nothing to keep and no memo of ours to forget. One another
        # delivery wrote meanwhile is left: written after its own store, it holds.)
        links = [item.url for item in parsed.items]
        await remember_page(engine, url, fresh.etag, fresh.last_modified, links)
    if counts.revision:
        await runtime.events.publish(ProjectsChanged(counts.revision))
    return task_pb2.UploadResult(
        page=page,
        found=len(parsed.items),
        created=counts.created,
        updated=counts.updated,
        skipped=parsed.skipped + counts.unstorable,
    )


async def _within_soft_limit(
    runtime: WorkerRuntime, page: int, task_id: str, deadline: float
) -> task_pb2.UploadResult:
    # This runs in an asyncio task of its own on the runtime's loop: its own log context.
    logs.task_context(task_id, page)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())) as limit:
            return await _fetch_parse_store(runtime, page, task_id, limit)
    except TimeoutError as exc:
        raise RetryableError(
            f"page {page} took longer than TASK_SOFT_TIME_LIMIT_SECONDS "
            f"({runtime.settings.task_soft_time_limit_seconds:g} s)"
        ) from exc


def harvest(
    runtime: WorkerRuntime, page: int, deadline: float, task_id: str
) -> task_pb2.UploadResult:
    settings = runtime.settings
    failpoints.hit(settings.failpoints, "before_fetch", page, settings.data_dir)
    # The loop's own limit is the soft limit; this one only guards against a loop that hangs:
    # the work, and two waits for a turn (robots.txt's and the page's) of at most the limit.
    guard = deadline - time.monotonic() + 2 * settings.task_soft_time_limit_seconds + 5.0
    try:
        result = runtime.run(
            tracing.on_loop(_within_soft_limit(runtime, page, task_id, deadline)), guard
        )
    except concurrent.futures.TimeoutError as exc:
        raise RetryableError(
            f"page {page}: the worker's event loop did not finish it within {guard:.0f} s"
        ) from exc
    failpoints.hit(settings.failpoints, "after_store", page, settings.data_dir)
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
# visit to the records' loop (worker.runtime.TaskRecords), not two; starts and ends are its own.


async def _retry_and_say(records: TaskRecords, task_id: str, error: str) -> None:
    record = await record_retry(records.engine, task_id, error)
    # A retry leaves the task's batch as it was: the batch's watchers are not woken.
    await records.events.publish(
        TaskChanged(task_id, record=None if record is None else record_json(record))
    )


def _ended(task: HarvestTask, outcome: Outcome) -> None:
    """Record the task's final state (counted once for its batch) and say so; publish the pages
    an "until known" batch enqueued as it did."""
    records = task.runtime.records
    finished = records.run(records.end(str(task.request.id), outcome))
    for new in finished.new_tasks:
        # A batch's page, as the gateway sends one: no states in the result backend.
        task.app.send_task(HARVEST_TASK_NAME, args=[new.page], task_id=new.id, ignore_result=True)
    if finished.new_tasks:
        records.run(mark_published(records.engine, [new.id for new in finished.new_tasks]))
    metrics.task_ended(outcome.status.lower())


def _retry(task: HarvestTask, exc: Exception, countdown: float) -> NoReturn:
    """`task.retry`, except that a retry whose message cannot be sent (a broker that hangs or is
    down) hands this delivery back instead of failing the task for good: Celery rejects it
    without requeueing, which reads FAILURE. Requeued, or left unacknowledged when even that
    cannot reach the broker, the message comes back (at the latest after the visibility
    timeout) and the task runs again."""
    try:
        raise task.retry(exc=exc, countdown=countdown, max_retries=None) from exc
    except Reject as rejected:
        # Celery's Reject(reason, requeue): the stubs do not declare its attributes.
        reason = rejected.args[0] if rejected.args else exc
        log.warning(
            "could not send the retry of task %s (%s); handing its message back",
            task.request.id,
            reason,
        )
        raise Reject(reason, requeue=True) from exc


def _ended_or_retry(task: HarvestTask, outcome: Outcome) -> None:
    """`_ended`, and when the record cannot be written now, a try later (which ends the same
    way, and writes it then): a final state must reach the record, or its batch never ends."""
    try:
        _ended(task, outcome)
    except RetryableError as exc:
        log.warning("could not record task %s's end (%s); trying again", task.request.id, exc)
        _retry(task, exc, 1.0)


def _result(result: task_pb2.UploadResult) -> dict[str, Any]:
    return json_format.MessageToDict(
        result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def run_harvest(task: HarvestTask, page: int, turns_missed: int = 0) -> dict[str, Any]:
    """Run the page's task. `turns_missed` counts the deliveries that gave their message back
    for want of a turn on the source: Celery counts them as retries, the policy does not."""
    started = time.monotonic()
    runtime = task.runtime
    settings = runtime.settings
    policy = RetryPolicy.from_settings(settings)
    tries_done = task.request.retries - turns_missed
    task_id = str(task.request.id)
    logs.task_context(task_id, page)
    tracing.set_attributes({tracing.PAGE: page, tracing.TRY: tries_done + 1})
    try:
        start: TaskStart | None = getattr(task.request, "start", None)
        if start is None:  # the prerun hook could not reach the database: try again here
            start = runtime.records.run(runtime.records.start(task_id))
        if start.deliveries == 0:
            # Its publish was reported failed (the record dropped, the caller told nothing was
            # enqueued) yet the message arrived, or its record expired: not ours to run.
            log.warning("page %d: task %s has no record; not run", page, task_id)
            return _result(task_pb2.UploadResult(page=page))
        if start.finished:
            log.info("page %d: task %s has ended already (cancelled); not run", page, task_id)
            return _result(task_pb2.UploadResult(page=page))
        if start.cancelled:
            raise Cancelled(f"page {page} was cancelled before it started")
        deaths = start.deliveries - (task.request.retries + 1)
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
                not_modified=result.not_modified,
            ),
        )
    except TurnNotGiven as exc:
        # The fleet has more pages in flight than the source's budget serves in a soft limit:
        # this one goes back to the queue, behind the others, without using up a try.
        log.info("page %d: %s; back to the queue", page, exc)
        raise task.retry(
            exc=exc,
            countdown=0,
            max_retries=None,
            kwargs={"turns_missed": turns_missed + 1},
        ) from exc
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
        _retry(task, exc, delay)
    except Exception as exc:
        # An error this module does not expect (a bug): the record ends FAILURE as well, so
        # that the page's batch counts it and can end; Celery logs and stores it as ever.
        if (done := succeeded_meanwhile(task, page)) is not None:
            return done
        unexpected = (
            f"page {page} failed unexpectedly ({type(exc).__name__}: {exc}); see the worker's log"
        )
        _ended_or_retry(task, Outcome("FAILURE", error=unexpected))
        raise
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
    # `store_errors_even_if_ignored`: a batch's page (sent with ignore_result) that fails
    # where run_harvest cannot record it (before it runs, or while its end is written) still
    # shows its FAILURE through the result backend, as a lone Upload's does.
    @app.task(
        bind=True,
        base=HarvestTask,
        name=HARVEST_TASK_NAME,
        throws=(PermanentError,),
        store_errors_even_if_ignored=True,
    )
    def harvest_page(self: HarvestTask, page: int, turns_missed: int = 0) -> dict[str, Any]:
        return run_harvest(self, page, turns_missed)

    @signals.task_prerun.connect(sender=harvest_page, weak=False)
    def record_delivery(task: HarvestTask, task_id: str, **_: Any) -> None:
        # Runs before Celery stores STARTED, so a task seen STARTED always has its start time.
        start = task.runtime.records.run(task.runtime.records.start(task_id))
        # Celery's request Context takes any attribute; the task body reads this one back.
        task.request.start = start  # type: ignore[attr-defined]

    return harvest_page

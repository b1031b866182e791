"""Issue tasks in groups: their records in one INSERT, then their messages in one pipeline.

Every Upload goes through here. A task's record is written before its message is sent (a
worker counts its starts on that record, and GetStatus answers from it), and dropped again if
the message could not be sent: kept, it would read PENDING until it expired and hold its
request_id hostage. An Upload with a request_id has claimed its record already (so repeats
find it): the group skips its INSERT and, once the message is sent, marks it published, which
is what a repeat of the request_id waits for.

A caller without a request_id that is cancelled before its group is cut is left out of it: no
record, no message. A request_id's claim and the issue of the record it made run to their end
whether or not their caller still waits (`claim`), so that no claimed record is left without a
publish, and a publish is never cut in half. Once cut, a group goes through whatever its
callers do.

A failed publish may have reached the broker after all (its answer lost, or its write held in
a socket through a partition and sent once the link healed). A worker runs no task without a
record, so such a message, once its record is dropped, never runs; and a record is dropped
only while no worker has started it: one started first is kept, and its caller hears OK.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from core import tracing
from core.batching import Batcher
from gateway.celery_queue import CeleryQueue, Publication
from gateway.errors import UNCONFIRMED, StoreUnavailable, Unavailable
from gateway.records import IssuedTask, TaskRecords

log = logging.getLogger(__name__)

# Tasks issued in one group at most.
MAX_ISSUE_BATCH = 256
VERDICT_MARGIN_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class _Issue:
    task: IssuedTask
    give_up: float  # time.monotonic() past which the caller has stopped waiting
    claimed: bool  # its record exists already (a request_id's), unpublished
    # The Upload's trace context, for its message (the group is published from another's).
    trace_headers: dict[str, str] | None = None
    # False for a re-issue of a record whose first publish may have gone out (its caller
    # heard OK): a failure now must not drop the record of a task that may be queued.
    droppable: bool = True


class Issuer:
    def __init__(self, records: TaskRecords, queue: CeleryQueue) -> None:
        self._records = records
        self._queue = queue
        self._groups = Batcher(self._issue_many, MAX_ISSUE_BATCH)
        self._claims: set[asyncio.Future[tuple[IssuedTask, bool]]] = set()

    async def claim(
        self, client: str, request_id: str, page: int, give_up: Callable[[], float]
    ) -> tuple[IssuedTask, bool]:
        """The record that holds `request_id`, and whether this call made it; one it made is
        issued as `issue` does, giving up at `give_up()`.

        Once asked for, the claim and that issue go on whatever the caller does: a caller gone
        between the two would leave a claimed record that nothing publishes until a repeat of
        the request_id finds it abandoned, 2 x PUBLISH_TIMEOUT_SECONDS later.
        """
        work = asyncio.ensure_future(self._claim_and_issue(client, request_id, page, give_up))
        self._claims.add(work)
        work.add_done_callback(self._claim_done)
        return await asyncio.shield(work)

    async def _claim_and_issue(
        self, client: str, request_id: str, page: int, give_up: Callable[[], float]
    ) -> tuple[IssuedTask, bool]:
        task, created = await self._records.claim(client, request_id, page)
        if created:
            await self.issue(task, give_up(), claimed=True)
        return task, created

    def _claim_done(self, work: asyncio.Future[tuple[IssuedTask, bool]]) -> None:
        self._claims.discard(work)
        if not work.cancelled():
            work.exception()  # its caller may have gone: read here so it is not logged as lost

    async def issue(
        self, task: IssuedTask, give_up: float, *, claimed: bool = False, droppable: bool = True
    ) -> None:
        """Record (unless `claimed`) and enqueue `task` unless `give_up` (monotonic) passes first.

        Raises StoreUnavailable or QueueUnavailable (an Unavailable either way): then nothing
        was sent and the record is gone again (a re-issue, not `droppable`, keeps it). At
        `give_up` the caller stops waiting whatever holds its group (a database or broker that
        hangs, a group before it that does): then it hears UNAVAILABLE, and its task goes out
        later, or not at all, as its group fares.
        """
        # give_up is time.monotonic(), the loop's clock. A moment later than the publish's own
        # give_up, so that its verdict (and the dropped record) reaches the caller first.
        issue = _Issue(task, give_up, claimed, tracing.current_headers(), droppable)
        waited = asyncio.timeout_at(give_up + VERDICT_MARGIN_SECONDS)
        try:
            async with waited:
                await self._groups.submit(issue, detached=claimed)
        except TimeoutError:
            if not waited.expired():
                raise
            raise Unavailable(UNCONFIRMED, cause="no answer before the caller's deadline") from None

    async def _issue_many(self, issues: list[_Issue]) -> list[BaseException | None]:
        fresh = [issue.task for issue in issues if not issue.claimed]
        try:
            if fresh:
                await self._records.add_many(fresh)
            errors = await self._queue.publish_many(
                [
                    Publication(
                        issue.task.id,
                        issue.task.page,
                        issue.give_up,
                        issue.trace_headers,
                        ignore_result=issue.task.batch_id is not None,
                    )
                    for issue in issues
                ]
            )
        except BaseException as exc:
            # Whatever stopped it (the database or broker unreachable, the loop closing), the
            # records must not outlive it; an INSERT cancelled mid-way may have gone out.
            await self._forget([(issue.task, exc) for issue in issues if issue.droppable])
            raise
        failed = [
            (issue.task, error)
            for issue, error in zip(issues, errors, strict=True)
            if error and issue.droppable
        ]
        if failed:
            # A task a worker started meanwhile did reach the broker: its caller hears so.
            started = await self._forget(failed)
            errors = [
                None if issue.task.id in started else error
                for issue, error in zip(issues, errors, strict=True)
            ]
        confirmed = [
            issue.task.id
            for issue, error in zip(issues, errors, strict=True)
            if issue.claimed and error is None
        ]
        if confirmed:
            try:
                await self._records.mark_published(confirmed)
            except StoreUnavailable:
                # Sent, but not marked: a repeat of the request_id publishes it again (same
                # id, idempotent storage) once its record looks abandoned.
                log.warning(
                    "%d task(s) were enqueued but their records could not say so", len(confirmed)
                )
        return errors

    async def _forget(self, failed: list[tuple[IssuedTask, BaseException]]) -> set[str]:
        """Drop the records of tasks whose publish failed; the ids a worker had started."""
        if not failed:
            return set()
        try:
            started = await self._records.forget_many([task.id for task, _ in failed])
        except StoreUnavailable:
            log.exception("could not drop the records of %d unpublished tasks", len(failed))
            return set()
        for task, reason in failed:
            if task.id in started:
                log.warning("publish of task %s said %s, yet a worker started it", task.id, reason)
            else:
                log.warning("publish of task %s failed: %s; its record is dropped", task.id, reason)
        return started

    async def drain(self) -> None:
        """Wait until every claim asked for and every group cut so far is issued."""
        await asyncio.gather(*self._claims, return_exceptions=True)
        await self._groups.drain()

"""Issue new tasks in groups: their records in one INSERT, then their messages in one pipeline.

An Upload without a request_id needs its record written before its message is sent (a worker
counts its starts on that record, and GetStatus answers from it), and the record dropped again
if the message could not be sent. Done per call, that is two batching stages, a task and a
shield per Upload; done for the group that arrived together, it is one stage (+20% Uploads/s
in the upload bench, in an interleaved A/B run on 2 cores).

A caller cancelled before its group is cut is left out of it: no record, no message. Once cut,
the group goes through whether or not its callers still wait.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gateway.batching import Batcher
from gateway.celery_queue import CeleryQueue, Publication
from gateway.records import IssuedTask, StoreUnavailable, TaskRecords

log = logging.getLogger(__name__)

# Tasks issued in one group at most.
MAX_ISSUE_BATCH = 256


@dataclass(frozen=True, slots=True)
class _Issue:
    task: IssuedTask
    give_up: float  # time.monotonic() past which the caller has stopped waiting


class Issuer:
    def __init__(self, records: TaskRecords, queue: CeleryQueue) -> None:
        self._records = records
        self._queue = queue
        self._groups = Batcher(self._issue_many, MAX_ISSUE_BATCH)

    async def issue(self, task: IssuedTask, give_up: float) -> None:
        """Record and enqueue `task` unless `give_up` (monotonic) passes first.

        Raises StoreUnavailable (nothing recorded, nothing sent) or QueueUnavailable (nothing
        sent, the record dropped again).
        """
        await self._groups.submit(_Issue(task, give_up))

    async def _issue_many(self, issues: list[_Issue]) -> list[BaseException | None]:
        tasks = [issue.task for issue in issues]
        try:
            await self._records.add_many(tasks)
        except asyncio.CancelledError as exc:
            # The loop is closing: the INSERT may have gone out before the cancel reached it.
            await self._forget(tasks, exc)
            raise
        try:
            errors = await self._queue.publish_many(
                [Publication(issue.task.id, issue.task.page, issue.give_up) for issue in issues]
            )
        except BaseException as exc:
            # Whatever stopped the publish (the broker unreachable, the loop closing), the
            # records must not outlive it: kept, each would read PENDING until it expired.
            await self._forget(tasks, exc)
            raise
        failed = [(issue.task, error) for issue, error in zip(issues, errors, strict=True) if error]
        if failed:
            await self._forget([task for task, _ in failed], failed[0][1])
        return errors

    async def _forget(self, tasks: list[IssuedTask], reason: BaseException) -> None:
        for task in tasks:
            # The same words as a failed publish of a request_id's task (gateway.service).
            log.warning("publish of task %s failed: %s; its record is dropped", task.id, reason)
        try:
            await self._records.forget_many([task.id for task in tasks])
        except StoreUnavailable:
            log.exception("could not drop the records of %d unpublished tasks", len(tasks))

    async def drain(self) -> None:
        """Wait until every group cut so far is issued."""
        await self._groups.drain()

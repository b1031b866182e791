"""Finds tasks the broker lost, so they read FAILURE "lost by the broker", not PENDING forever.

A Redis without persistence that restarts forgets its queue; the gateway's records remember.
A task is lost when it was enqueued longer ago than RECONCILE_AFTER_SECONDS, no worker ever
started it, its result store knows nothing of it, and it is neither waiting in the queue nor
held by a worker, in two passes in a row (a message between two lists is not mistaken).
Brokers whose queues cannot be read without consuming them (AMQP) are not judged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from core.db import utcnow
from gateway.celery_queue import CeleryQueue
from gateway.database import retry_contended
from gateway.errors import Unavailable
from gateway.records import TaskRecords

log = logging.getLogger(__name__)

LOST_BY_BROKER = (
    "lost by the broker: enqueued at {enqueued:%Y-%m-%d %H:%M:%S} UTC, never started, and no "
    "longer queued (was the broker restarted without persistence?); Upload the page again"
)
NEVER_PUBLISHED = (
    "never reached the broker: the gateway stopped before it confirmed the enqueue at "
    "{enqueued:%Y-%m-%d %H:%M:%S} UTC; Upload the page again"
)


class Reconciler:
    def __init__(
        self,
        records: TaskRecords,
        queue: CeleryQueue,
        queue_name: str,
        after: dt.timedelta,
        interval: float,
    ) -> None:
        self._records = records
        self._queue = queue
        self._queue_name = queue_name
        self._after = after
        self._interval = interval
        self._suspects: set[str] = set()

    async def run_once(self) -> set[str]:
        """One pass; the ids it judged lost."""
        candidates = await self._records.unstarted_before(utcnow() - self._after)
        if not candidates:
            self._suspects.clear()
            return set()
        queued = await self._queue.queued_ids(self._queue_name)
        if queued is None:
            return set()
        missing = {}
        for task in candidates:
            if task.id not in queued and (await self._queue.state(task.id)).status == "PENDING":
                template = LOST_BY_BROKER if task.published_at else NEVER_PUBLISHED
                missing[task.id] = template.format(enqueued=task.enqueued_at)
        lost = {task_id: reason for task_id, reason in missing.items() if task_id in self._suspects}
        # Until they are marked, the lost stay suspects: a pass whose mark fails leaves them to
        # the next one, not to two more.
        self._suspects = set(missing)
        if lost:
            # A worker's end may lock the same batch rows at the same moment (a deadlock or a
            # serialization failure the database resolves by giving one up): ours runs again.
            await retry_contended(lambda: self._records.mark_lost(lost))
            self._suspects -= set(lost)
            log.error(
                "%d task(s) lost before a worker saw them: %s", len(lost), ", ".join(sorted(lost))
            )
        return set(lost)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except Unavailable:
                pass  # health says so already; the next pass tries again
            except Exception:
                # A bug here must not end reconciling for the rest of the process's life.
                log.exception("reconciler pass failed")

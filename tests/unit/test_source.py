"""worker.source: the soft time limit's clock stopped while a task waits for its turn."""

from __future__ import annotations

import asyncio
import contextlib

from worker.source import _off_the_clock


async def test_a_limit_that_expired_meanwhile_is_left_alone() -> None:
    """Under load the deadline can pass between two awaits: the Timeout is then EXPIRING (it
    has cancelled the task) and asyncio raises RuntimeError on any reschedule. The cluster
    suite met it as "Cannot change state of expiring Timeout", a task FAILURE."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout_at(loop.time() - 1) as limit:
        # The timeout fires at this await and cancels the task; swallowed, as a library may,
        # it leaves the limit EXPIRING.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
        assert limit.expired()
        with _off_the_clock(limit):
            pass
    asyncio.current_task().uncancel()  # type: ignore[union-attr]


async def test_the_clock_stops_for_the_block() -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5.0) as limit:
        before = limit.when()
        assert before is not None
        with _off_the_clock(limit):
            await asyncio.sleep(0.05)
        after = limit.when()
        assert after is not None and after - before >= 0.05 - 1e-3
        assert not limit.expired() and loop.time() < after

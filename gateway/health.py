"""The standard health service, kept in step with the broker and the database.

A watcher pings both every BROKER_CHECK_INTERVAL_SECONDS. A ping that has not answered within
that interval (or DEPENDENCY_TIMEOUT_SECONDS, the shorter) counts as down: a dependency that
hangs without closing its sockets marks the gateway NOT_SERVING within two intervals, as one
that refuses does, and the watcher never waits on it (a ping still in flight at the next check
is waited for again, not started twice). The queue and the records call `mark_down` the moment
a call of theirs finds the broker or the database unreachable, which marks the gateway
NOT_SERVING at once; the next good ping marks it SERVING again, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from grpc_health.v1 import health_pb2

from gateway.contract import PROJECT_SERVICE_NAME, QUEUE_SERVICE_NAME

log = logging.getLogger(__name__)

# "" is the whole server, as probes such as `grpc_health_probe` ask by default.
SERVICES = ("", QUEUE_SERVICE_NAME, PROJECT_SERVICE_NAME)

Probe = Callable[[], Awaitable[bool]]
# What a client of a dependency calls when a call finds it unreachable (`mark_down`).
OnUnavailable = Callable[[], Awaitable[None]]


async def nobody() -> None:
    """An `on_unavailable` for a client that has no health to tell (a test's, a tool's)."""
    return


def _retrieve(ping: asyncio.Future[bool]) -> None:
    if not ping.cancelled() and ping.exception() is not None:
        log.debug("health probe failed", exc_info=ping.exception())


class DependencyHealth:
    # `servicer` is a grpc_health.v1.health.aio.HealthServicer, which the type stubs lack.
    def __init__(self, servicer: Any, interval: float, probe_timeout: float) -> None:
        self.servicer = servicer
        self._probes: list[Probe] = []
        self._interval = interval
        # Longer, and a hang would be noticed only after more than two intervals.
        self._probe_timeout = min(probe_timeout, interval)
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight: dict[int, asyncio.Task[bool]] = {}

    async def _set(self, serving: bool, why: str = "") -> None:
        if serving == self._serving:
            return
        first = self._serving is None
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in SERVICES:
            await self.servicer.set(name, status)
        log.log(
            # The first status (NOT_SERVING while it starts) is no news.
            logging.INFO if serving or first else logging.WARNING,
            "health: %s%s",
            "SERVING" if serving else "NOT_SERVING",
            f" ({why})" if why else "",
        )

    @property
    def serving(self) -> bool | None:
        """The state last set: SERVING (True), NOT_SERVING (False), or not checked yet."""
        return self._serving

    def watch(self, probes: list[Probe]) -> None:
        """Ping these (each True when its dependency answers) from now on."""
        self._probes = probes

    def _ping(self, index: int, probe: Probe) -> asyncio.Task[bool]:
        running = self._in_flight.get(index)
        if running is None or running.done():
            running = asyncio.ensure_future(probe())
            # Read when it ends, whether or not a check still waits for it (one that ends after
            # its check gave up on it is not "never retrieved").
            running.add_done_callback(_retrieve)
            self._in_flight[index] = running
        return running

    async def check_now(self) -> bool:
        pings = [self._ping(index, probe) for index, probe in enumerate(self._probes)]
        if pings:
            await asyncio.wait(pings, timeout=self._probe_timeout)
        down = []
        for probe, ping in zip(self._probes, pings, strict=True):
            name = getattr(probe, "__qualname__", repr(probe))
            if not ping.done():
                down.append(f"{name} did not answer within {self._probe_timeout:g} s")
            elif ping.cancelled() or ping.exception() is not None or not ping.result():
                down.append(f"{name} failed")
        await self._set(not down, "; ".join(down))
        return not down

    async def mark_down(self, why: str = "a call found a dependency unreachable") -> None:
        await self._set(False, why)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_now()
            except Exception:
                log.exception("health check failed")
                await self._set(False, "the check itself failed")

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="health-watch")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for ping in self._in_flight.values():
            ping.cancel()
        await self.servicer.enter_graceful_shutdown()

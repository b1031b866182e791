"""The standard health service, kept in step with the broker and the database.

A watcher pings both every BROKER_CHECK_INTERVAL_SECONDS. The queue and the records call
`mark_down` the moment a call of theirs finds the broker or the database unreachable, which
marks the gateway NOT_SERVING at once; the next good ping marks it SERVING again, without a
restart.
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


class DependencyHealth:
    # `servicer` is a grpc_health.v1.health.aio.HealthServicer, which the type stubs lack.
    def __init__(self, servicer: Any, interval: float) -> None:
        self.servicer = servicer
        self._probes: list[Probe] = []
        self._interval = interval
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def _set(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in SERVICES:
            await self.servicer.set(name, status)
        log.log(
            logging.INFO if serving else logging.WARNING,
            "health: %s",
            "SERVING" if serving else "NOT_SERVING",
        )

    @property
    def serving(self) -> bool | None:
        """The state last set: SERVING (True), NOT_SERVING (False), or not checked yet."""
        return self._serving

    def watch(self, probes: list[Probe]) -> None:
        """Ping these (each True when its dependency answers) from now on."""
        self._probes = probes

    async def check_now(self) -> bool:
        results = await asyncio.gather(*(probe() for probe in self._probes))
        serving = all(results)
        await self._set(serving)
        return serving

    async def mark_down(self) -> None:
        await self._set(False)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_now()
            except Exception:
                log.exception("health check failed")
                await self._set(False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="health-watch")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()

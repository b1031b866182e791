"""gateway.health without a server: a probe that hangs counts as down within the bound, and one
that answers again brings SERVING back; a hung probe is waited for again, not started twice."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from grpc_health.v1 import health_pb2

from gateway.health import SERVICES, DependencyHealth

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeServicer:
    """What DependencyHealth asks of grpc's health servicer: `set` and the shutdown."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self._changed = asyncio.Condition()

    async def set(self, service: str, status: Any) -> None:
        async with self._changed:
            self.status[service] = status
            self._changed.notify_all()

    async def reaches(self, status: Any) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.status.get("") == status)

    async def enter_graceful_shutdown(self) -> None:
        self.status.clear()


class Dependency:
    """A probe whose dependency answers at once, fails, or hangs until released."""

    def __init__(self) -> None:
        self.answer = True
        self.hanging = False
        self.released = asyncio.Event()
        self.calls = 0

    async def ping(self) -> bool:
        self.calls += 1
        if self.hanging:
            await self.released.wait()
        return self.answer


async def test_a_hanging_probe_counts_as_down_within_its_timeout_and_recovers() -> None:
    servicer, dependency = FakeServicer(), Dependency()
    health = DependencyHealth(servicer, interval=10.0, probe_timeout=0.2)
    health.watch([dependency.ping])
    assert await health.check_now() is True
    assert {servicer.status[name] for name in SERVICES} == {SERVING}

    dependency.hanging = True
    started = time.monotonic()
    assert await health.check_now() is False
    took = time.monotonic() - started
    assert 0.15 <= took < 1.0, took
    assert {servicer.status[name] for name in SERVICES} == {NOT_SERVING}

    # Still hung at the next check: waited for again, not a second ping piling up.
    assert await health.check_now() is False
    assert dependency.calls == 2

    dependency.released.set()
    dependency.hanging = False
    assert await health.check_now() is True
    assert servicer.status[""] == SERVING
    await health.shutdown()


async def test_the_probe_timeout_is_at_most_the_interval() -> None:
    # Else a hang would be noticed only after more than two intervals.
    dependency = Dependency()
    dependency.hanging = True
    health = DependencyHealth(FakeServicer(), interval=0.1, probe_timeout=30.0)
    health.watch([dependency.ping])
    started = time.monotonic()
    assert await health.check_now() is False
    assert time.monotonic() - started < 1.0
    dependency.released.set()
    await health.shutdown()


async def test_the_watcher_marks_a_hang_not_serving_within_two_intervals() -> None:
    servicer, dependency = FakeServicer(), Dependency()
    health = DependencyHealth(servicer, interval=0.1, probe_timeout=1.0)
    health.watch([dependency.ping])
    await health.check_now()
    health.start()
    dependency.hanging = True
    hung_at = time.monotonic()
    async with asyncio.timeout(5):
        await servicer.reaches(NOT_SERVING)
    assert time.monotonic() - hung_at <= 2 * 0.1 + 0.15
    dependency.hanging = False
    dependency.released.set()
    async with asyncio.timeout(5):
        await servicer.reaches(SERVING)
    await health.shutdown()


async def test_a_probe_that_raises_counts_as_down() -> None:
    async def broken() -> bool:
        raise RuntimeError("a bug in a probe")

    servicer = FakeServicer()
    health = DependencyHealth(servicer, interval=1.0, probe_timeout=1.0)
    health.watch([broken])
    assert await health.check_now() is False
    assert servicer.status[""] == NOT_SERVING

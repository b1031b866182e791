"""core.waiting.until_done with a fake clock: tries again while the failure may pass, with a
growing pause, says so once and then once a minute, and raises at once what waiting won't cure."""

from __future__ import annotations

import itertools
import logging

import pytest

from core.waiting import Backoff, until_done


class Clock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def refused_until(successful_try: int) -> tuple[list[int], object]:
    tries: list[int] = []

    async def attempt() -> str:
        tries.append(len(tries) + 1)
        if len(tries) < successful_try:
            raise ConnectionRefusedError("refused")
        return "done"

    return tries, attempt


async def test_it_tries_again_with_a_growing_pause_until_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    tries, attempt = refused_until(6)
    backoff = Backoff(first=0.5, longest=3.0, log_every=60.0)
    with caplog.at_level(logging.INFO, logger="core.waiting"):
        result: object = await until_done(
            attempt,  # type: ignore[arg-type]
            "the database",
            lambda exc: isinstance(exc, OSError),
            backoff=backoff,
            clock=clock,
            sleep=clock.sleep,
        )
    assert result == "done" and len(tries) == 6
    assert clock.pauses == [0.5, 1.0, 2.0, 3.0, 3.0]
    waits = [r for r in caplog.records if "waiting for the database" in r.getMessage()]
    assert len(waits) == 1  # 5 failures in 9.5 s: told once
    assert "ConnectionRefusedError" in waits[0].getMessage()
    assert any("answered after 5 failed tries" in r.getMessage() for r in caplog.records)


async def test_a_long_wait_is_told_once_a_minute() -> None:
    clock = Clock()
    _, attempt = refused_until(100)
    told_at: list[float] = []

    class AtClock(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for the database" in record.getMessage():
                told_at.append(clock.now)

    handler = AtClock()
    logging.getLogger("core.waiting").addHandler(handler)
    try:
        await until_done(
            attempt,  # type: ignore[arg-type]
            "the database",
            lambda exc: isinstance(exc, OSError),
            backoff=Backoff(first=1.0, longest=5.0, log_every=60.0),
            clock=clock,
            sleep=clock.sleep,
        )
    finally:
        logging.getLogger("core.waiting").removeHandler(handler)
    # 99 failures over about 480 s: told at the first, then at the first failure a minute on.
    assert told_at[0] == 0.0
    gaps = [later - earlier for earlier, later in itertools.pairwise(told_at)]
    assert len(gaps) >= 6 and all(60.0 <= gap < 65.0 for gap in gaps), told_at


async def test_a_failure_that_waiting_will_not_cure_is_raised_at_once() -> None:
    clock = Clock()

    async def attempt() -> None:
        raise ValueError("password authentication failed")

    with pytest.raises(ValueError, match="password"):
        await until_done(
            attempt,
            "the database",
            lambda exc: isinstance(exc, OSError),
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.pauses == []


async def test_each_failure_that_may_pass_is_told_to_on_failure() -> None:
    clock = Clock()
    seen: list[str] = []
    _, attempt = refused_until(3)
    await until_done(
        attempt,  # type: ignore[arg-type]
        "the database",
        lambda exc: isinstance(exc, OSError),
        on_failure=lambda exc: seen.append(type(exc).__name__),
        clock=clock,
        sleep=clock.sleep,
    )
    assert seen == ["ConnectionRefusedError", "ConnectionRefusedError"]

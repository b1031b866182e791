"""gateway.ratelimit: a token bucket per client, on a clock the test moves.

The limiter reads `time.monotonic()` itself; the tests give its module a clock of their own.
"""

from __future__ import annotations

import types

import pytest

from gateway import ratelimit
from gateway.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    # Only the limiter's module sees this clock; the event loop and everything else keep theirs.
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


def test_a_rate_of_0_is_off_and_never_refuses(clock: Clock) -> None:
    limiter = RateLimiter(per_second=0, burst=1)

    assert not limiter.enabled
    assert [limiter.acquire("alice") for _ in range(1_000)] == [0.0] * 1_000


def test_a_burst_goes_ahead_at_once_and_the_next_call_waits_one_interval(clock: Clock) -> None:
    limiter = RateLimiter(per_second=2, burst=5)

    assert limiter.enabled
    assert [limiter.acquire("alice") for _ in range(5)] == [0.0] * 5
    assert limiter.acquire("alice") == pytest.approx(0.5)


def test_the_wait_is_what_is_left_of_the_interval(clock: Clock) -> None:
    limiter = RateLimiter(per_second=4, burst=1)
    assert limiter.acquire("alice") == 0.0

    clock.advance(0.1)

    assert limiter.acquire("alice") == pytest.approx(0.15)


def test_a_call_after_the_wait_it_was_told_goes_ahead(clock: Clock) -> None:
    limiter = RateLimiter(per_second=10, burst=1)
    assert limiter.acquire("alice") == 0.0
    wait = limiter.acquire("alice")
    assert wait > 0

    clock.advance(wait)

    assert limiter.acquire("alice") == 0.0


def test_refused_calls_cost_nothing(clock: Clock) -> None:
    # Clients that retry at once do not push their own next turn further away.
    limiter = RateLimiter(per_second=1, burst=1)
    assert limiter.acquire("alice") == 0.0
    for _ in range(50):
        assert limiter.acquire("alice") == pytest.approx(1.0)

    clock.advance(1.0)

    assert limiter.acquire("alice") == 0.0


def test_tokens_come_back_at_the_rate(clock: Clock) -> None:
    limiter = RateLimiter(per_second=5, burst=10)
    for _ in range(10):
        assert limiter.acquire("alice") == 0.0

    clock.advance(1.0)  # five calls' worth

    assert [limiter.acquire("alice") == 0.0 for _ in range(6)] == [True] * 5 + [False]


def test_an_idle_client_saves_up_no_more_than_a_burst(clock: Clock) -> None:
    limiter = RateLimiter(per_second=100, burst=3)
    assert limiter.acquire("alice") == 0.0

    clock.advance(3_600.0)

    assert [limiter.acquire("alice") == 0.0 for _ in range(4)] == [True, True, True, False]


def test_each_client_has_a_bucket_of_its_own(clock: Clock) -> None:
    limiter = RateLimiter(per_second=1, burst=2)
    assert [limiter.acquire("alice") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("alice") > 0

    assert [limiter.acquire("bob") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("bob") > 0


def test_a_new_client_starts_with_a_full_burst_whenever_it_comes(clock: Clock) -> None:
    limiter = RateLimiter(per_second=1, burst=4)
    assert limiter.acquire("alice") == 0.0
    clock.advance(10_000.0)

    assert [limiter.acquire("carol") for _ in range(4)] == [0.0] * 4
    assert limiter.acquire("carol") == pytest.approx(1.0)


def test_a_steady_client_at_the_rate_is_never_refused(clock: Clock) -> None:
    # A quarter of a second is exact in binary: the clock's sums carry no rounding error.
    limiter = RateLimiter(per_second=4, burst=1)

    refused = 0
    for _ in range(1_000):
        refused += limiter.acquire("alice") > 0
        clock.advance(0.25)

    assert refused == 0

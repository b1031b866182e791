"""RetryPolicy: exponential backoff with equal jitter, Retry-After within a cap, bounded tries."""

from __future__ import annotations

import itertools
import statistics

import pytest

from core.settings import Settings
from tests.unit.helpers import clear_settings_environment
from worker.retry import RetryPolicy

SAMPLES = 2000
POLICY = RetryPolicy(max_tries=4, base_delay=1.0, max_delay=30.0, retry_after_cap=60.0)


def samples(policy: RetryPolicy, tries_done: int) -> list[float]:
    return [policy.delay(tries_done) for _ in range(SAMPLES)]


@pytest.mark.parametrize("tries_done", [0, 1])
def test_first_delay_is_at_most_two_seconds(tries_done: int) -> None:
    delays = samples(POLICY, tries_done)

    assert max(delays) <= 2.0
    # Equal jitter: half the step is fixed, so it never comes back at once either.
    assert min(delays) >= 0.5
    assert max(delays) <= 1.0


@pytest.mark.parametrize("tries_done", [1, 2, 3, 4, 5])
def test_each_delay_lies_within_half_its_step_and_the_whole_step(tries_done: int) -> None:
    step = 2.0 ** (tries_done - 1)  # base 1.0; below the 30 s cap up to the 5th try

    delays = samples(POLICY, tries_done)

    assert step / 2 <= min(delays)
    assert max(delays) <= step


def test_delays_grow_exponentially() -> None:
    means = [statistics.fmean(samples(POLICY, tries_done)) for tries_done in range(1, 6)]

    for earlier, later in itertools.pairwise(means):
        assert 1.8 <= later / earlier <= 2.2
    # 0.75 of the step: the middle of [step/2, step].
    assert means[0] == pytest.approx(0.75, rel=0.05)


@pytest.mark.parametrize("tries_done", [6, 7, 12, 60, 1000])
def test_delays_are_capped_by_max_delay(tries_done: int) -> None:
    delays = samples(POLICY, tries_done)

    assert max(delays) <= POLICY.max_delay
    assert min(delays) >= POLICY.max_delay / 2


def test_delay_stays_capped_for_any_number_of_tries() -> None:
    assert POLICY.max_delay / 2 <= POLICY.delay(1025) <= POLICY.max_delay


def test_jitter_varies_the_delay() -> None:
    delays = samples(POLICY, 3)  # step 4 s: delays in [2, 4]

    assert len(set(delays)) > SAMPLES * 0.9
    assert min(delays) < 2.2
    assert max(delays) > 3.8


def test_zero_base_delay_retries_at_once() -> None:
    policy = RetryPolicy(max_tries=4, base_delay=0.0, max_delay=30.0, retry_after_cap=60.0)

    assert {policy.delay(n) for n in range(1, 10)} == {0.0}


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (3.0, 3.0),
        (0.0, 0.0),
        (45.0, 45.0),  # above max_delay: the source's word still counts, up to its own cap
        (60.0, 60.0),
        (3600.0, 60.0),
        (-5.0, 0.0),
    ],
)
def test_retry_after_is_honoured_up_to_its_cap(retry_after: float, expected: float) -> None:
    for tries_done in (1, 3, 10):
        assert POLICY.delay(tries_done, retry_after) == expected


def test_can_retry_bounds_the_tries() -> None:
    policy = RetryPolicy(max_tries=3, base_delay=1.0, max_delay=30.0, retry_after_cap=60.0)

    assert [policy.can_retry(done) for done in range(5)] == [True, True, True, False, False]
    tries = 1  # the first try failed
    while policy.can_retry(tries):
        tries += 1  # and so did every retry
    assert tries == policy.max_tries


def test_from_settings_takes_the_retry_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings_environment(monkeypatch)
    settings = Settings(
        _env_file=None,
        retry_max_tries=7,
        retry_base_delay_seconds=0.5,
        retry_max_delay_seconds=12.0,
        retry_after_cap_seconds=40.0,
    )

    assert RetryPolicy.from_settings(settings) == RetryPolicy(
        max_tries=7, base_delay=0.5, max_delay=12.0, retry_after_cap=40.0
    )

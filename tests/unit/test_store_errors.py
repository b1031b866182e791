"""gateway.database: a database outage reported as such, a deadlock not (and run again)."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy.exc import DBAPIError

from gateway.database import CONTENDED_ATTEMPTS, retry_contended, store_errors
from gateway.errors import STORE_CONTENDED, STORE_DOWN, StoreContended, StoreUnavailable


class _DriverError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


def _database_error(sqlstate: str) -> DBAPIError:
    return DBAPIError("UPDATE batches ...", {}, _DriverError(sqlstate))


class _Health:
    def __init__(self) -> None:
        self.downs = 0

    async def mark_down(self) -> None:
        self.downs += 1


@pytest.mark.parametrize("sqlstate", ["40P01", "40001", "55P03"])
async def test_a_transaction_given_up_for_a_concurrent_one_is_not_an_outage(
    sqlstate: str,
) -> None:
    health = _Health()
    with pytest.raises(StoreContended) as raised:
        async with store_errors(health.mark_down):
            raise _database_error(sqlstate)
    assert health.downs == 0
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.message == STORE_CONTENDED
    # Every caller that handles a store outage handles this too (a published Upload's
    # mark_published, the purge loop): they did before it had a class of its own.
    assert isinstance(raised.value, StoreUnavailable)


@pytest.mark.parametrize("sqlstate", ["08006", "57P01", "53300"])
async def test_an_unreachable_database_is_an_outage_the_health_is_told_of(sqlstate: str) -> None:
    health = _Health()
    with pytest.raises(StoreUnavailable) as raised:
        async with store_errors(health.mark_down):
            raise _database_error(sqlstate)
    assert not isinstance(raised.value, StoreContended)
    assert health.downs == 1
    assert raised.value.message == STORE_DOWN


async def test_an_error_in_what_was_asked_is_not_disguised() -> None:
    health = _Health()
    with pytest.raises(DBAPIError):
        async with store_errors(health.mark_down):
            raise _database_error("23505")  # a unique violation: a bug, not the database's state
    assert health.downs == 0


async def test_a_contended_transaction_runs_again_until_it_is_not() -> None:
    calls = 0

    async def work() -> str:
        nonlocal calls
        calls += 1
        if calls < CONTENDED_ATTEMPTS:
            raise StoreContended("deadlock detected")
        return "done"

    assert await retry_contended(work) == "done"
    assert calls == CONTENDED_ATTEMPTS


@pytest.mark.parametrize(
    ("error", "calls_made"),
    [
        (StoreContended("deadlock detected"), CONTENDED_ATTEMPTS),  # contended every time
        (StoreUnavailable("connection refused"), 1),  # an outage is not waited out here
    ],
)
async def test_a_contention_that_lasts_or_an_outage_is_raised_as_it_is(
    error: StoreUnavailable, calls_made: int
) -> None:
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise error

    with pytest.raises(type(error)) as raised:
        await retry_contended(failing)
    assert raised.value is error
    assert calls == calls_made

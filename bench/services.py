"""The machine's services and the real processes, borrowed from the test harness.

tests/support already starts the gateway, workers and the scriptable site as real processes and
carves a fresh PostgreSQL database and a Redis key prefix per run; the bench reuses it as is.
Its service helpers skip through pytest when a service is missing, which here means the figure
that needs it is left out, said on stderr.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from bench.common import say
from tests.support import services
from tests.support.processes import Process, free_port, start_gateway
from tests.support.stack import TEST_TOKEN, health_status

REPOSITORY = Path(__file__).resolve().parent.parent


class ServiceMissing(Exception):
    """A machine service the figure needs does not answer."""


@contextlib.contextmanager
def _unless_skipped(what: str) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:  # pytest's Skipped derives from BaseException
        if type(exc).__name__ != "Skipped":
            raise
        raise ServiceMissing(f"{what}: {exc}") from None


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); its asyncpg URL."""
    with _unless_skipped("PostgreSQL"), services.postgres_database() as url:
        yield url


@contextlib.contextmanager
def redis_namespace() -> Iterator[tuple[str, str]]:
    """The machine's Redis and a key prefix of this run's own, emptied afterwards."""
    prefix = f"bench-{uuid.uuid4().hex[:12]}:"
    with _unless_skipped("Redis"), services.redis_namespace(prefix) as url:
        yield url, prefix


def environment(
    directory: Path, redis_url: str, prefix: str, database_url: str, **extra: str
) -> dict[str, str]:
    """The settings gateway and workers share in one bench run (see the README's table)."""
    return {
        "DATA_DIR": str(directory / "data"),
        "API_TOKENS": f"bench:{TEST_TOKEN}",
        "GATEWAY_ADDRESS": f"127.0.0.1:{free_port()}",
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "TASK_QUEUE": f"{prefix}harvest",
        "DATABASE_URL": database_url,
        # The bench's own site needs no protecting; polite_efficiency sets a real budget.
        "SOURCE_MAX_REQUESTS_PER_SECOND": "100000",
        "SOURCE_MAX_CONCURRENCY": "100000",
        # Bench processes import `bench` (the baseline worker), which is not installed.
        "PYTHONPATH": os.pathsep.join(
            filter(None, [os.environ.get("PYTHONPATH"), str(REPOSITORY)])
        ),
        **extra,
    }


@contextlib.contextmanager
def gateway(directory: Path, env: dict[str, str]) -> Iterator[tuple[Process, str]]:
    """A running `python -m gateway`, SERVING; the process and its address."""
    process = start_gateway(directory, env)
    address = env["GATEWAY_ADDRESS"]
    try:
        _wait_until_serving(process, address)
        say(f"  gateway {process.pid} serving on {address}")
        yield process, address
    finally:
        process.stop()


CHECKS_IN_A_ROW = 16


def _wait_until_serving(process: Process, address: str, timeout: float = 60.0) -> None:
    """Until health says SERVING on CHECKS_IN_A_ROW new connections in a row: with
    GATEWAY_PROCESSES, each connection lands on one process, and each process passes its own
    start-up gate (until then its calls answer UNAVAILABLE, "the gateway is starting")."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < CHECKS_IN_A_ROW:
        try:
            serving = health_status(address) == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            serving = False  # not listening yet
        in_a_row = in_a_row + 1 if serving else 0
        if serving:
            continue
        if process.popen.poll() is not None:
            raise RuntimeError(f"the gateway exited:\n{process.output()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not serve within {timeout} s:\n{process.output()}")
        time.sleep(0.1)

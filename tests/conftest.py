"""Fixtures: factories for real processes and per-test namespaces on the machine's services."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.support.processes import (
    PostgresServer,
    RedisServer,
    Site,
    free_port,
    postgres_bin,
    start_site,
)
from tests.support.services import (
    postgres_database,
    postgres_role_refused,
    rabbitmq_vhost,
    redis_namespace,
    require,
)
from tests.support.stack import Stack, base_environment


@contextlib.contextmanager
def own_redis_server(directory: Path, appendonly: bool = True) -> Iterator[RedisServer]:
    server = RedisServer(directory, free_port(), appendonly=appendonly)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def stacks_in(
    directory: Path, site: Site, failed: Callable[[], bool]
) -> Iterator[Callable[..., Stack]]:
    """A factory of stacks sharing `site`; all closed (logs shown on failure) at the end."""
    made: list[Stack] = []

    def make(
        broker_url: str | None = None,
        backend_url: str | None = None,
        database_url: str | None = None,
        **extra: str,
    ) -> Stack:
        env = base_environment(directory, site)
        if broker_url:
            env["CELERY_BROKER_URL"] = broker_url
        if backend_url:
            env["CELERY_RESULT_BACKEND"] = backend_url
        if database_url:
            env["DATABASE_URL"] = database_url
        env.update(extra)
        stack = Stack(directory, env, site)
        made.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in made:
            stack.close()
            if failed():
                print(stack.logs())


StackFactory = Callable[..., Stack]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The event loop async tests run on (pyproject's anyio_mode = "auto"): asyncio, as in the
    gateway and the worker; trio is not a backend this code supports."""
    return "asyncio"


@pytest.fixture(scope="module")
def module_stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """One running stack (own Redis, SQLite, gateway, one worker) shared by a module's tests."""
    directory = tmp_path_factory.mktemp("stack")
    site = start_site(directory)
    try:
        with (
            own_redis_server(directory / "redis") as redis_server,
            stacks_in(directory, site, lambda: request.session.testsfailed > 0) as make,
        ):
            stack = make(broker_url=redis_server.url)
            stack.start_gateway()
            stack.start_worker()
            yield stack
    finally:
        site.process.stop()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    started = start_site(tmp_path)
    yield started
    started.process.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (tests that stop or break the broker use it)."""
    with own_redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of the test's own, initialised but not started (tests that pause
    or start the database late use it; the machine's is never paused)."""
    bin_dir = postgres_bin()
    require("PostgreSQL's initdb and pg_ctl", bin_dir is not None)
    assert bin_dir is not None
    server = PostgresServer(bin_dir)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def refused_postgres_url(postgres_url: str) -> Iterator[str]:
    """`postgres_url` as a role PostgreSQL refuses for "too many connections"."""
    with postgres_role_refused(postgres_url) as url:
        yield url


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    with rabbitmq_vhost() as url:
        yield url


def _failed(request: pytest.FixtureRequest) -> Callable[[], bool]:
    def failed() -> bool:
        report = getattr(request.node, "rep_call", None)
        return bool(report is not None and report.failed)

    return failed


@pytest.fixture
def make_stack(
    tmp_path: Path, site: Site, request: pytest.FixtureRequest
) -> Iterator[StackFactory]:
    """make_stack(broker_url=..., backend_url=..., database_url=..., **env) -> Stack."""
    with stacks_in(tmp_path, site, _failed(request)) as make:
        yield make


@pytest.fixture
def redis_stack(make_stack: StackFactory, own_redis: RedisServer) -> Stack:
    """A stack on a Redis server of the test's own (broker and results), SQLite database."""
    return make_stack(broker_url=own_redis.url)


@pytest.fixture
def machine_redis(make_stack: StackFactory) -> Iterator[Callable[..., Stack]]:
    """make(**kw) -> a stack on the machine's Redis, under a key prefix of its own."""
    prefixes: list[contextlib.ExitStack] = []
    stacks: list[Stack] = []

    def make(**kwargs: str) -> Stack:
        stack = make_stack(**kwargs)
        stacks.append(stack)
        namespace = contextlib.ExitStack()
        prefixes.append(namespace)
        url = namespace.enter_context(redis_namespace(stack.env["REDIS_KEY_PREFIX"]))
        stack.env.setdefault("CELERY_BROKER_URL", url)
        stack.env.setdefault("CELERY_RESULT_BACKEND", url)
        return stack

    yield make
    for stack in stacks:
        stack.close()  # before the keys go, so no process writes them again
    for namespace in prefixes:
        namespace.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Kept on the item so fixtures can print the processes' logs when the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report

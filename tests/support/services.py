"""The machine's PostgreSQL, Redis and RabbitMQ, each carved into a namespace per test.

With CI=true a service that does not answer fails the test; elsewhere the test is skipped
with the reason.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import pytest
import redis

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(service: str, reachable: bool) -> None:
    if reachable:
        return
    message = f"{service} is not reachable on this machine"
    if in_ci():
        pytest.fail(f"{message}, and CI=true requires it")
    pytest.skip(message)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def admin(statement: str) -> None:
    """Run one SQL statement as the superuser, on a connection to the `test` database of its own.

    Synchronous, on an event loop of its own: the contexts below are entered from sync fixtures
    and tests, never from inside a running loop.
    """

    async def execute() -> None:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="test")
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(execute())


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test; its asyncpg URL."""
    require("PostgreSQL (127.0.0.1:5432)", _port_open(PG_HOST, PG_PORT))
    name = f"harvest_test_{uuid.uuid4().hex[:12]}"
    admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres_role_refused(database_url: str) -> Iterator[str]:
    """`database_url` as a role PostgreSQL refuses for "too many connections" (SQLSTATE 53300),
    the way it refuses everyone once max_connections is reached."""
    role = f"refused_{uuid.uuid4().hex[:12]}"
    admin(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
    try:
        yield database_url.replace(f"://{PG_USER}@", f"://{role}@", 1)
    finally:
        admin(f'DROP ROLE IF EXISTS "{role}"')


@contextmanager
def redis_namespace(prefix: str) -> Iterator[str]:
    """The machine's Redis; every key the test made under `prefix` is deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
        reachable = True
    except redis.RedisError:
        reachable = False
    require("Redis (127.0.0.1:6379)", reachable)
    try:
        yield REDIS_URL
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()


@contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of the test's own; its AMQP URL."""
    require("RabbitMQ (127.0.0.1:5672)", _port_open(RABBIT_HOST, RABBIT_PORT))
    ctl = shutil.which("rabbitmqctl")
    require("rabbitmqctl (to make a vhost)", ctl is not None)
    assert ctl is not None
    vhost = f"harvest-test-{uuid.uuid4().hex[:12]}"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        [ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], check=False, capture_output=True)

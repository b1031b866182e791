"""worker.kombu_fixes on a real kombu Redis channel (the machine's Redis, a prefix of its own)."""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.concurrency import thread as celery_threads
from kombu import Connection
from kombu.transport import redis as kombu_redis

from tests.support.services import redis_namespace
from worker import kombu_fixes

pytestmark = pytest.mark.redis


@pytest.fixture
def channel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # Patched for this test only: the rest of the session runs kombu as the gateway does.
    monkeypatch.setattr(kombu_redis.Channel, "conn_or_acquire", kombu_redis.Channel.conn_or_acquire)
    monkeypatch.setattr(kombu_redis.QoS, "restore_unacked", kombu_redis.QoS.restore_unacked)
    kombu_fixes.apply()
    prefix = f"test-kombu-{uuid.uuid4().hex[:12]}:"
    with (
        redis_namespace(prefix) as url,
        Connection(url, transport_options={"global_keyprefix": prefix}) as connection,
    ):
        yield connection.default_channel


def test_a_channel_reuses_one_client_for_calls_made_without_one(channel: Any) -> None:
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
        first.hset("hash", "field", b"value")
        assert second.hget("hash", "field") == b"value"


def test_a_client_passed_in_is_the_one_used(channel: Any) -> None:
    own = channel._create_client()
    with channel.conn_or_acquire(own) as client:
        assert client is own


def test_a_replaced_pool_gets_a_client_of_its_own(channel: Any) -> None:
    with channel.conn_or_acquire() as before:
        before.hset("hash", "field", b"value")
    # What kombu does when the broker connection drops: the pools are closed and made anew.
    channel._disconnect_pools()
    with channel.conn_or_acquire() as after:
        assert after is not before
        assert after.connection_pool is channel.pool
        assert after.hget("hash", "field") == b"value"


def test_the_thread_pool_lets_a_cold_shutdown_cancel_its_running_tasks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Celery's cold shutdown calls terminate_job for each running task; the thread pool's own
    # raised NotImplementedError out of the signal handler (celery/celery#10490).
    kombu_fixes.apply()
    pool = celery_threads.TaskPool(limit=1)

    with caplog.at_level(logging.INFO, logger="worker.kombu_fixes"):
        pool.terminate_job(12345, signal.SIGTERM)  # raised NotImplementedError before

    assert "ends when the worker's loops stop" in caplog.text


def test_the_thread_pool_stops_from_a_signal_handler_that_interrupted_a_submit() -> None:
    # The SIGQUIT handler runs pool.stop() in the main thread, which may hold the executor's
    # shutdown lock in submit() at that moment: stopping must not wait for that lock.
    kombu_fixes.apply()
    pool: Any = celery_threads.TaskPool(limit=1)
    stopped = threading.Event()

    def main_thread_in_submit_then_signalled() -> None:
        with pool.executor._shutdown_lock:  # as submit() holds it
            pool.on_stop()  # as the handler calls it
            stopped.set()

    thread = threading.Thread(target=main_thread_in_submit_then_signalled, daemon=True)
    thread.start()

    assert stopped.wait(5), "pool.stop() waited for the lock its own thread held"

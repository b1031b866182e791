"""core.events.events_url: the broker URL forms kombu takes, as redis-py URLs that it parses."""

from __future__ import annotations

import pytest
import redis

from core.events import events_url


def test_the_embedded_brokers_socket_url_is_one_redis_py_connects_to() -> None:
    url = events_url("redis+socket:///tmp/harvest/data/redis.sock", "")
    assert url == "unix:///tmp/harvest/data/redis.sock"
    kwargs = redis.ConnectionPool.from_url(url).connection_kwargs
    assert kwargs["path"] == "/tmp/harvest/data/redis.sock"


def test_a_tcp_redis_url_is_kept_and_an_amqp_broker_takes_the_backend() -> None:
    assert events_url("redis://127.0.0.1:6379/0", "") == "redis://127.0.0.1:6379/0"
    assert events_url("amqp://guest@host//", "redis://r:6379/1") == "redis://r:6379/1"
    with pytest.raises(ValueError, match="events need a Redis"):
        events_url("amqp://guest@host//", "rpc://")

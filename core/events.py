"""One feed of events from workers to gateways: Redis pub/sub, on one channel.

A worker says what it made true after the commit that made it true (`EventPublisher`); each
gateway process listens with one subscriber (`listen`) and wakes the watch streams it serves.
Events wake watchers and are never the truth: a woken watcher reads the database, and a
watcher also reads it on a slow timer, so a lost event (Redis down, a gateway that was
restarting) costs latency, never data. A worker's TaskChanged also carries the task's record as
its commit left it (`record`), and its batch's when the commit moved that (`batch`), so that a
watcher it wakes can send that state without reading the database; one that cannot tell it is
newer than what it sent reads the database as before.

The channel lives on the broker's Redis, or the result backend's when the broker is AMQP,
prefixed by REDIS_KEY_PREFIX like every key.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

CHANNEL = "harvester.events"
LISTEN_RETRY_SECONDS = 1.0
# How soon the listening thread notices that it should stop.
LISTEN_POLL_SECONDS = 0.5
MAX_QUEUED_EVENTS = 10_000


@dataclass(frozen=True, slots=True)
class ProjectsChanged:
    """Projects were created or changed, up to feed revision `revision`, and committed."""

    revision: int


@dataclass(frozen=True, slots=True)
class TaskChanged:
    """A task's record changed (started, retried, finished), and maybe its batch's."""

    task_id: str
    # The batch whose record the commit may have moved too (its watchers are woken); None when
    # it moved no batch's: a lone task, or a page whose start or retry left its batch as it was.
    batch_id: str | None = None
    # The task's record (its columns by name) as the commit this event follows left it, JSON
    # values with times as ISO 8601 strings (`record_json`); None: the writer did not have it.
    record: Mapping[str, Any] | None = None
    # The batch's record as the commit left it, likewise; None: the writer did not have it.
    batch: Mapping[str, Any] | None = None


def record_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A record's columns as JSON values, for a TaskChanged to carry."""
    return {
        name: value.isoformat() if isinstance(value, dt.datetime) else value
        for name, value in row.items()
    }


Event = ProjectsChanged | TaskChanged


def events_url(broker_url: str, backend_url: str) -> str:
    """The redis-py URL of the Redis that carries events (kombu's URL forms translated)."""
    url = broker_url if broker_url.startswith(("redis", "rediss")) else backend_url
    parts = urlsplit(url)
    if parts.scheme == "redis+socket":
        # Spelled out: urlunsplit drops the "//" of an empty host, and redis-py reads only
        # "unix://" URLs (the embedded broker's event listener died on "unix:/...").
        query = f"?{parts.query}" if parts.query else ""
        return f"unix://{parts.path}{query}"
    if not parts.scheme.startswith("redis"):
        raise ValueError(f"events need a Redis broker or result backend, not {parts.scheme}://")
    return url


def _encode(event: Event) -> str:
    if isinstance(event, TaskChanged):
        message: dict[str, Any] = {"kind": "task", "task": event.task_id, "batch": event.batch_id}
        if event.record is not None:
            message["record"] = event.record
        if event.batch is not None:
            message["batch_record"] = event.batch
        return json.dumps(message)
    return json.dumps({"kind": "projects", "revision": event.revision})


def _decode(data: bytes | str) -> Event | None:
    try:
        message = json.loads(data)
        if message.get("kind") == "projects":
            return ProjectsChanged(int(message["revision"]))
        if message.get("kind") == "task":
            batch = message.get("batch")
            record = message.get("record")
            batch_record = message.get("batch_record")
            return TaskChanged(
                str(message["task"]),
                None if batch is None else str(batch),
                record if isinstance(record, dict) else None,
                batch_record if isinstance(batch_record, dict) else None,
            )
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    log.warning("ignored an event that is not ours: %.80r", data)
    return None


class EventPublisher:
    """The worker's side: publish events on the process's event loop.

    An event is a hint: a publish that cannot be made within `timeout` (DEPENDENCY_TIMEOUT_SECONDS,
    for the connect and for the whole publish) is dropped, not waited for.
    """

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._timeout = timeout
        self._channel = prefix + CHANNEL
        self._failing = False

    async def publish(self, event: Event) -> None:
        """Publish `event`; a failure is logged (once per outage) and otherwise ignored."""
        await self.publish_all([event])

    async def publish_all(self, events: Sequence[Event]) -> None:
        """Publish `events` in order, in one round trip; failures as for `publish`."""
        try:
            async with asyncio.timeout(self._timeout):
                if len(events) == 1:
                    await self._client.publish(self._channel, _encode(events[0]))
                else:
                    async with self._client.pipeline(transaction=False) as pipeline:
                        for event in events:
                            pipeline.publish(self._channel, _encode(event))
                        await pipeline.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._failing:
                log.warning("could not publish events (watchers catch up by timer): %s", exc)
            self._failing = True
            return
        if self._failing:
            log.info("publishing events again")
        self._failing = False

    async def close(self) -> None:
        await self._client.aclose()


async def listen(url: str, prefix: str) -> AsyncIterator[Event]:
    """Every event published from now on, until the caller stops; reconnects after a failure.

    The subscriber runs on a thread of its own with the blocking client: redis-py's asyncio
    pub/sub can swallow a cancel that lands while it connects, which left a stopping gateway
    waiting on it for ever. The thread hands events to the loop and stops soon after this
    generator is closed (it checks every LISTEN_POLL_SECONDS).
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue(MAX_QUEUED_EVENTS)
    stop = threading.Event()
    thread = threading.Thread(
        target=_subscribe, args=(url, prefix + CHANNEL, loop, events, stop), daemon=True
    )
    thread.name = "event-listener"
    thread.start()
    try:
        while True:
            yield await events.get()
    finally:
        stop.set()


def _subscribe(
    url: str,
    channel: str,
    loop: asyncio.AbstractEventLoop,
    events: asyncio.Queue[Event],
    stop: threading.Event,
) -> None:
    failing = False
    while not stop.is_set():
        client = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=LISTEN_POLL_SECONDS + 5
        )
        try:
            with client.pubsub(ignore_subscribe_messages=True) as pubsub:  # type: ignore[no-untyped-call]
                pubsub.subscribe(channel)
                if failing:
                    log.info("listening to events again")
                failing = False
                while not stop.is_set():
                    message = pubsub.get_message(timeout=LISTEN_POLL_SECONDS)
                    event = None if message is None else _decode(message["data"])
                    if event is not None:
                        loop.call_soon_threadsafe(_offer, events, event)
        except (RedisError, OSError) as exc:
            if not failing:
                log.warning("event feed lost (watchers catch up by timer): %s", exc)
            failing = True
            stop.wait(LISTEN_RETRY_SECONDS)
        except RuntimeError:
            return  # the loop closed under us: nobody listens any more
        finally:
            client.close()


def _offer(events: asyncio.Queue[Event], event: Event) -> None:
    # A hint: when the listener is this far behind, one more wake-up changes nothing.
    with contextlib.suppress(asyncio.QueueFull):
        events.put_nowait(event)

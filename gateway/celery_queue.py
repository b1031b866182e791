"""The gateway's side of Celery: publish a harvest by task name, read a task's state back.

Every Celery, kombu or Redis call blocks, so each runs on a small thread pool of its own, never
on the event loop. Broker and backend failures leave this module as `QueueUnavailable`, after
telling `on_unavailable` (the gateway's health).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.events import Event
from celery.utils.time import utcoffset
from kombu.exceptions import KombuError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from core import tracing
from core.celery_config import HARVEST_TASK_NAME
from gateway.errors import BROKER_DOWN, RESULTS_DOWN, TOO_BUSY, QueueUnavailable, Unavailable
from gateway.health import OnUnavailable, nobody
from gateway.metrics import count_publishes

log = logging.getLogger(__name__)

# Any id in a message counts: a false match only delays a verdict of "lost".
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_QUEUE_ERRORS = (KombuError, KombuOperationalError, RedisError, OSError, TimeoutError)
PUBLISH_RETRIES = 2
PING_LOG_EVERY_SECONDS = 60.0


class PublishingCelery(Celery):
    """A Celery app that publishes tasks and reads their state, and never waits on a result."""

    def _get_backend(self) -> Any:
        # Private, and absent from the stubs, but the one place every thread's backend is made.
        backend = super()._get_backend()  # type: ignore[misc]
        # Celery's Redis backend subscribes to each sent task's result channel so that `.get()`
        # can wait on it. The gateway never waits: the subscriptions would only pile up, and
        # after a broker outage they fail the app for good ("must be restarted").
        backend.on_task_call = _no_subscription
        return backend


def _no_subscription(producer: object, task_id: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Publication:
    """One harvest task to enqueue."""

    task_id: str
    page: int
    give_up: float  # time.monotonic() past which the caller has stopped waiting
    trace_headers: dict[str, str] | None = None  # the Upload's trace context, when traced
    # A batch's page: its states live in its record alone (the batch's counts, GetStatus and
    # the watches read them there), so the worker writes none to Celery's result backend.
    ignore_result: bool = False


@dataclass(frozen=True, slots=True)
class CeleryState:
    """A task's state as the result backend holds it."""

    status: str
    result: Any
    finished_at: dt.datetime | None


class CeleryQueue:
    def __init__(
        self,
        app: Celery,
        publish_timeout: float,
        dependency_timeout: float,
        threads: int = 8,
        on_unavailable: OnUnavailable = nobody,
    ) -> None:
        self._app = app
        self._on_unavailable = on_unavailable
        self._publish_timeout = publish_timeout
        # A read may wait for a free thread and then take a connect and a command: past this
        # its caller hears UNAVAILABLE, whatever the thread is still stuck in.
        self._read_bound = 2 * dependency_timeout
        # Every socket operation of the gateway's broker and result-store clients is bounded
        # by DEPENDENCY_TIMEOUT_SECONDS (the worker's 10 s suit a consumer, not a caller
        # waiting on an answer), and none is retried on a timeout: a Redis that stops
        # answering without closing its sockets (paused, a full disk, a network black hole)
        # answers UNAVAILABLE at once instead of after a retry of the same wait.
        options = dict(app.conf.broker_transport_options or {})
        options["socket_timeout"] = dependency_timeout
        options["socket_connect_timeout"] = dependency_timeout
        # One connection attempt per try: `_publish_many` retries within the caller's deadline
        # (kombu would otherwise retry for as long as its connect timeout allows).
        options["max_retries"] = 0
        app.conf.broker_transport_options = options
        # Read when the app makes its result backend (one per thread, on first use).
        app.conf.redis_socket_timeout = dependency_timeout
        app.conf.redis_socket_connect_timeout = dependency_timeout
        app.conf.redis_retry_on_timeout = False
        # Publishes have a thread of their own, so reads and health pings never queue them; one
        # is enough, as what arrives while it sends a batch goes out together in the next.
        self._publish_executor = ThreadPoolExecutor(1, thread_name_prefix="celery-publish")
        self._queue = app.amqp.queues[app.conf.task_default_queue]
        # Where `send_task` would route a harvest: the same for every message, worked out once.
        self._route: dict[str, Any] = app.amqp.router.route({}, HARVEST_TASK_NAME)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="celery-read")
        # Where and as whom task-sent events go (TASK_EVENTS): the dispatcher's own exchange,
        # serializer and hostname header, so that `celery events` and Flower read ours as theirs.
        self._events_connection = app.connection_for_write()  # lazy: it never connects
        self._events = app.events.Dispatcher(self._events_connection, enabled=False)
        self._ping_logged_at: float | None = None  # when a failed ping was last logged

    async def _call(
        self,
        function: Any,
        *args: Any,
        executor: ThreadPoolExecutor | None = None,
        unavailable: str = RESULTS_DOWN,
    ) -> Any:
        """`function(*args)` on a thread; a broker or backend failure as QueueUnavailable.

        A read (on the shared pool) is waited for at most its bound; a publish bounds itself
        by its callers' deadlines.
        """
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(executor or self._executor, function, *args)
        bound = None if executor is self._publish_executor else self._read_bound
        try:
            return await asyncio.wait_for(running, bound)
        except _QUEUE_ERRORS as exc:  # TimeoutError among them: wait_for's own
            await self._on_unavailable()
            cause = (
                f"no answer within {bound:g} s"
                if running.cancelled()
                else f"{type(exc).__name__}: {exc}"
            )
            raise QueueUnavailable(cause, unavailable) from exc

    def _publish_many(
        self, tasks: list[Publication]
    ) -> tuple[list[BaseException | None], str | None]:
        """Send `tasks` in one batch, again while some are within their deadline.

        Each task's error (None: sent), and the broker's last failure if there was one.
        """
        errors: list[BaseException | None] = [None] * len(tasks)
        live = list(range(len(tasks)))
        # Bounded retries: kombu's default policy can keep a caller waiting far longer than any
        # gRPC deadline while the broker is down.
        interval = max(self._publish_timeout / (PUBLISH_RETRIES + 1), 0.05)
        failure: str | None = None
        while True:
            now = time.monotonic()
            for index in live:
                if tasks[index].give_up <= now:
                    errors[index] = (
                        QueueUnavailable(failure)
                        if failure
                        else Unavailable(TOO_BUSY, cause="its deadline passed before its turn")
                    )
            live = [index for index in live if errors[index] is None]
            if not live:
                return errors, failure
            try:
                sent_events = _SentEvents()
                # One Redis pipeline for the batch when the producer's channel can batch (kombu
                # sends one message at a time otherwise, e.g. over AMQP): room for each task's
                # message and the batch's one event message, so it is sent in one round trip.
                with (
                    self._app.producer_or_acquire() as producer,
                    producer.batch(len(live) + 1),
                ):
                    # Declared once per batch, not once per message: kombu re-binds a copy of
                    # the queue for every message it is asked to declare, even when cached.
                    producer.maybe_declare(self._queue)
                    for index in live:
                        self._send(producer, tasks[index], sent_events)
                    self._publish_events(producer, sent_events.fields)
                return errors, failure
            except _QUEUE_ERRORS as exc:
                # A pipeline that failed midway may have delivered some of its messages (kombu
                # says "uncertain"); sent again, such a task runs twice under one id, and its
                # storage is idempotent (at least once, never lost).
                failure = f"{type(exc).__name__}: {exc}"
                soonest = min(tasks[index].give_up for index in live)
                time.sleep(max(0.0, min(interval, soonest - time.monotonic())))

    def _publish_events(self, producer: Any, sent: list[dict[str, Any]]) -> None:
        """The batch's task-sent events as one `task.multi` message, as a worker sends the
        events it buffers: one message and one serialization per batch instead of one per task
        (nearly half of the publish thread's time, bench/README.md). Celery's EventReceiver,
        and so `celery events` and Flower, reads each event of the list."""
        if not sent:
            return
        dispatcher = self._events
        # What EventDispatcher.publish makes of each event and hands to the producer.
        events = [
            Event(
                "task-sent",
                hostname=dispatcher.hostname,
                utcoffset=utcoffset(),
                pid=dispatcher.pid,
                clock=dispatcher.clock.forward(),
                **fields,
            )
            for fields in sent
        ]
        producer.publish(
            events,
            routing_key="task.multi",
            exchange=dispatcher.exchange.name,
            retry=False,
            declare=[dispatcher.exchange],
            serializer=dispatcher.serializer,
            headers=dispatcher.headers,
            delivery_mode=dispatcher.delivery_mode,
        )

    def _send(self, producer: Any, task: Publication, sent_events: _SentEvents) -> None:
        """Send `task` as `Celery.send_task` would, in half the time.

        The message is Celery's own (`create_task_message`, `send_task_message`, with the
        options `send_task` gives them; tests/unit/test_celery_queue.py holds the two equal but
        for the sending thread's id), without what `send_task` adds per call for a caller that
        waits on results: an AsyncResult, its parent-task lookups, the routing and option
        merging done anew: half of the publish thread's time (bench/README.md).
        """
        options: dict[str, Any] = {
            **self._route,
            "declare": [],
            "retry": False,  # retried by `_publish_many`, within each caller's deadline
            # What the worker logs for the call; given, it is not saferepr'd.
            "argsrepr": f"[{task.page}]",
            "kwargsrepr": "{}",
        }
        amqp = self._app.amqp
        message = amqp.create_task_message(
            task.task_id,
            HARVEST_TASK_NAME,
            [task.page],
            {},
            reply_to=self._app.thread_oid,
            create_sent_event=self._app.conf.task_send_sent_event,
            ignore_result=task.ignore_result or None,
            **options,
        )
        if task.trace_headers is None:
            amqp.send_task_message(
                producer, HARVEST_TASK_NAME, message, event_dispatcher=sent_events, **options
            )
            return
        # The publish as a span of the Upload's trace; its context rides in the message's
        # headers, where the worker's celery instrumentation picks it up.
        span = tracing.span_from_headers(f"publish {HARVEST_TASK_NAME}", task.trace_headers)
        span.set_attribute(tracing.PAGE, task.page)
        headers = dict(task.trace_headers)
        tracing.inject_into(headers, span)
        try:
            amqp.send_task_message(
                producer,
                HARVEST_TASK_NAME,
                message,
                headers=headers,
                event_dispatcher=sent_events,
                **options,
            )
        finally:
            span.end()

    async def publish_many(self, tasks: list[Publication]) -> list[BaseException | None]:
        """Enqueue `tasks` in one broker round trip (more while within their deadlines).

        Each item's outcome: None when enqueued, else an Unavailable (a QueueUnavailable when
        the broker failed). The call itself raises QueueUnavailable only when the broker could
        not be reached at all.
        """
        try:
            sent: tuple[list[BaseException | None], str | None] = await self._call(
                self._publish_many,
                tasks,
                executor=self._publish_executor,
                unavailable=BROKER_DOWN,
            )
        except QueueUnavailable:
            count_publishes(sent=0, failed=len(tasks))
            raise
        errors, broker_failure = sent
        failed = sum(error is not None for error in errors)
        count_publishes(sent=len(errors) - failed, failed=failed)
        if broker_failure is not None and any(errors):
            await self._on_unavailable()
        return errors

    def _read(self, task_id: str) -> CeleryState:
        meta = self._app.backend.get_task_meta(task_id)
        return CeleryState(
            status=str(meta.get("status", "PENDING")),
            result=meta.get("result"),
            finished_at=_as_utc(meta.get("date_done")),
        )

    async def state(self, task_id: str) -> CeleryState:
        result: CeleryState = await self._call(self._read, task_id)
        return result

    def _ping(self) -> None:
        with self._app.connection_for_write() as connection:
            # One attempt: the health watcher asks again soon enough, and bounds its wait.
            connection.ensure_connection(max_retries=0)
            # Redis transports connect lazily: ask the server itself.
            client = getattr(connection.default_channel, "client", None)
            if client is not None:
                client.ping()
        backend_client = getattr(self._app.backend, "client", None)
        if backend_client is not None:
            backend_client.ping()

    async def ping(self) -> bool:
        try:
            await self._call(self._ping)
        except QueueUnavailable as exc:
            # Once when an outage begins, then at most once a minute: health pings every few
            # seconds, and a long outage must not flood the log.
            now = time.monotonic()
            if self._ping_logged_at is None or now - self._ping_logged_at >= PING_LOG_EVERY_SECONDS:
                log.warning("broker or result store unreachable: %s", exc)
                self._ping_logged_at = now
            return False
        if self._ping_logged_at is not None:
            log.info("broker and result store answer again")
        self._ping_logged_at = None
        return True

    def _queued_ids(self, queue: str) -> set[str] | None:
        with self._app.connection_for_write() as connection:
            channel = connection.default_channel
            client = getattr(channel, "client", None)
            if client is None:
                return None  # not Redis: AMQP queues cannot be read without taking from them
            # LRANGE and HVALS are not among the commands kombu prefixes by itself.
            prefix = getattr(channel, "global_keyprefix", "") or ""
            waiting = client.lrange(prefix + queue, 0, -1)
            held = client.hvals(prefix + getattr(channel, "unacked_key", "unacked"))
        found: set[str] = set()
        for raw in (*waiting, *held):
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            found.update(_TASK_ID.findall(text))
        return found

    async def queued_ids(self, queue: str) -> set[str] | None:
        """Ids of tasks waiting in `queue` or held unacked by a worker; None if unknowable."""
        result: set[str] | None = await self._call(self._queued_ids, queue)
        return result

    def _revoke(self, task_ids: list[str]) -> None:
        self._app.control.revoke(task_ids)

    async def revoke(self, task_ids: list[str]) -> None:
        """Tell the workers to drop these tasks if they hold them queued: a hint only (the
        records' cancel is what holds), so a broker that does not answer is only logged."""
        if not task_ids:
            return
        try:
            await self._call(self._revoke, task_ids)
        except QueueUnavailable as exc:
            log.warning("could not send revoke for %d task(s): %s", len(task_ids), exc)

    def close(self) -> None:
        self._events.close()
        self._events_connection.release()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._publish_executor.shutdown(wait=False, cancel_futures=True)
        self._app.close()


class _SentEvents:
    """Stands in for Celery's event dispatcher in `send_task_message`: keeps each task's
    task-sent fields (queue, exchange and routing key filled in) for `_publish_events`."""

    def __init__(self) -> None:
        self.fields: list[dict[str, Any]] = []

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **options: Any) -> None:
        self.fields.append(fields)


def _as_utc(value: object) -> dt.datetime | None:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)

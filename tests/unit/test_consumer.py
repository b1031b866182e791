"""worker/consumer.py: buffered task events are sent together, at most every EVENT_FLUSH_SECONDS.

The consumer is Celery's own with `_flush_events` replaced, built here as a worker builds it
(on an in-memory broker); Celery asks for `_flush_events` on the event loop's next turn after
each buffered event. A fake hub (its next turn and its timer) and dispatcher (its buffer and
sends) stand in for the loop and the broker, and the clock is the test's.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.utils.imports import symbol_by_name

from core.celery_config import celery_config
from core.settings import Settings
from worker import consumer as consumer_module
from worker.consumer import EVENT_FLUSH_SECONDS, LOST_SEND_SECONDS, Consumer


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Hub:
    """kombu's Hub as far as the consumer uses it: callbacks for its next turn and its timer."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.soon: list[Callable[[], None]] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        if callback not in self.soon:  # a set, in kombu
            self.soon.append(callback)

    def turn(self) -> None:
        ready, self.soon = self.soon, []
        for callback in ready:
            callback()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((self.clock.now + delay, callback))

    def fire_due(self) -> None:
        due = [timer for timer in self.timers if timer[0] <= self.clock.now]
        self.timers = [timer for timer in self.timers if timer[0] > self.clock.now]
        for _, callback in due:
            callback()


class _Dispatcher:
    """Celery's EventDispatcher as far as the consumer uses it: a buffer and its flush."""

    def __init__(self) -> None:
        self.buffered: list[str] = []
        self.sent: list[list[str]] = []
        self.flushes = 0
        self.fail = False
        # What Celery's Events step reads and calls as it closes a dispatcher.
        self.groups = None
        self.connection = None

    def disable(self) -> None:
        return None

    def flush(self) -> None:
        self.flushes += 1
        if self.fail:
            raise ConnectionError("the broker is gone")
        if self.buffered:
            self.sent.append(self.buffered)
            self.buffered = []


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(consumer_module, "monotonic", clock)
    return clock


def _consumer(hub: _Hub | None, dispatcher: _Dispatcher) -> Any:
    """The consumer a worker with event loop `hub` builds, its dispatcher `dispatcher`."""
    consumer: Any = Consumer(
        lambda *_, **__: None,
        app=Celery("test-consumer", broker="memory://", set_as_current=False),
        hub=hub,
        controller=SimpleNamespace(use_eventloop=hub is not None, semaphore=None),
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
    )
    consumer.event_dispatcher = dispatcher
    return consumer


def _event(consumer: Any, dispatcher: _Dispatcher, name: str) -> None:
    """What Celery does for a buffered event: buffer it, then ask for a flush on the loop's
    next turn (`on_send_event_buffered`); the turn comes."""
    dispatcher.buffered.append(name)
    consumer.on_send_event_buffered()
    if consumer.hub is not None:
        consumer.hub.turn()
    else:
        consumer._flush_events()


def test_the_worker_runs_this_consumer() -> None:
    config = celery_config(Settings(celery_broker_url="redis://127.0.0.1:1/0"))
    assert symbol_by_name(config["worker_consumer"]) is Consumer


def test_the_first_event_goes_out_at_once_and_the_next_ones_together(clock: _Clock) -> None:
    hub, dispatcher = _Hub(clock), _Dispatcher()
    consumer = _consumer(hub, dispatcher)

    _event(consumer, dispatcher, "received")
    assert dispatcher.sent == [["received"]]

    clock.now += EVENT_FLUSH_SECONDS / 4
    _event(consumer, dispatcher, "started")
    clock.now += EVENT_FLUSH_SECONDS / 4
    _event(consumer, dispatcher, "succeeded")
    hub.fire_due()
    assert dispatcher.sent == [["received"]], "sent before the interval had passed"
    assert len(hub.timers) == 1, "one send set on the timer for both events"

    clock.now += EVENT_FLUSH_SECONDS
    hub.fire_due()
    assert dispatcher.sent == [["received"], ["started", "succeeded"]]


def test_an_event_after_a_quiet_spell_goes_out_at_once(clock: _Clock) -> None:
    hub, dispatcher = _Hub(clock), _Dispatcher()
    consumer = _consumer(hub, dispatcher)
    _event(consumer, dispatcher, "first")
    clock.now += EVENT_FLUSH_SECONDS * 3
    _event(consumer, dispatcher, "second")
    assert dispatcher.sent == [["first"], ["second"]]
    assert hub.timers == []


@pytest.mark.parametrize("ending", ["stop", "shutdown", "on_close"])
def test_stopping_or_losing_the_connection_sends_what_waits_on_the_timer(
    clock: _Clock, ending: str
) -> None:
    hub, dispatcher = _Hub(clock), _Dispatcher()
    consumer = _consumer(hub, dispatcher)
    _event(consumer, dispatcher, "received")
    _event(consumer, dispatcher, "succeeded")
    assert dispatcher.sent == [["received"]]
    getattr(consumer, ending)()
    assert dispatcher.sent == [["received"], ["succeeded"]]


def test_a_reconnect_leaves_nothing_in_the_dispatcher_it_replaces(clock: _Clock) -> None:
    """Celery calls on_close, then makes a new dispatcher that takes over only the old one's
    failed sends: what the old one buffered must be sent (or failed) by then."""
    hub, old = _Hub(clock), _Dispatcher()
    consumer = _consumer(hub, old)
    _event(consumer, old, "received")
    _event(consumer, old, "started")
    consumer.on_close()
    consumer.event_dispatcher = new = _Dispatcher()
    clock.now += EVENT_FLUSH_SECONDS
    hub.fire_due()  # the timer outlives the reconnect; its send finds nothing
    assert old.sent == [["received"], ["started"]] and old.buffered == []
    _event(consumer, new, "succeeded")
    clock.now += EVENT_FLUSH_SECONDS
    hub.fire_due()
    assert new.sent == [["succeeded"]]


def test_stopping_with_nothing_waiting_sends_nothing(clock: _Clock) -> None:
    hub, dispatcher = _Hub(clock), _Dispatcher()
    consumer = _consumer(hub, dispatcher)
    _event(consumer, dispatcher, "received")
    flushes = dispatcher.flushes
    consumer.stop()
    assert dispatcher.flushes == flushes


def test_a_failing_send_at_shutdown_does_not_stop_the_shutdown(
    clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    hub, dispatcher = _Hub(clock), _Dispatcher()
    consumer = _consumer(hub, dispatcher)
    _event(consumer, dispatcher, "received")
    _event(consumer, dispatcher, "succeeded")
    dispatcher.fail = True
    consumer.shutdown()
    assert "task events not sent as the connection closed" in caplog.text


def test_a_send_held_up_past_its_time_is_not_waited_for(clock: _Clock) -> None:
    hub, dispatcher = _Hub(clock), _Dispatcher()
    consumer = _consumer(hub, dispatcher)
    _event(consumer, dispatcher, "received")
    _event(consumer, dispatcher, "started")
    clock.now += EVENT_FLUSH_SECONDS + LOST_SEND_SECONDS  # the timer has not fired
    _event(consumer, dispatcher, "succeeded")
    assert dispatcher.sent == [["received"], ["started", "succeeded"]]


def test_without_a_loop_every_flush_sends(clock: _Clock) -> None:
    dispatcher = _Dispatcher()
    consumer = _consumer(None, dispatcher)
    _event(consumer, dispatcher, "received")
    _event(consumer, dispatcher, "started")
    assert dispatcher.sent == [["received"], ["started"]]

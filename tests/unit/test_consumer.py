"""worker/consumer.py: buffered task events are sent together, at most every EVENT_FLUSH_SECONDS.

The consumer is Celery's own with `_flush_events` replaced; Celery calls it on the event
loop's next turn after each buffered event. A fake hub (its timer) and dispatcher (its sends)
stand in for the loop and the broker, and the clock is the test's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from worker import consumer as consumer_module
from worker.consumer import EVENT_FLUSH_SECONDS, LOST_SEND_SECONDS, Consumer


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Hub:
    """kombu's Hub as far as the consumer uses it: callbacks set on its timer."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.timers: list[tuple[float, Callable[[], None]]] = []

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

    def flush(self) -> None:
        if self.buffered:
            self.sent.append(self.buffered)
            self.buffered = []


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(consumer_module, "monotonic", clock)
    return clock


def _consumer(hub: _Hub | None, dispatcher: _Dispatcher) -> Any:
    # Celery's constructor builds a whole worker's consumer; only these are read.
    consumer: Any = Consumer.__new__(Consumer)
    consumer.hub = hub
    consumer.event_dispatcher = dispatcher
    return consumer


def _event(consumer: Any, dispatcher: _Dispatcher, name: str) -> None:
    """What Celery does for a buffered event: buffer it, then ask for a flush."""
    dispatcher.buffered.append(name)
    consumer._flush_events()


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


def test_stopping_sends_what_waits_on_the_timer(clock: _Clock) -> None:
    hub, dispatcher = _Hub(clock), _Dispatcher()
    consumer = _consumer(hub, dispatcher)
    _event(consumer, dispatcher, "received")
    _event(consumer, dispatcher, "succeeded")
    assert dispatcher.sent == [["received"]]
    consumer._send_pending()  # what stop() and shutdown() do before Celery's own
    assert dispatcher.sent == [["received"], ["succeeded"]]
    consumer._send_pending()
    assert dispatcher.sent == [["received"], ["succeeded"]], "nothing was waiting"


def test_a_send_lost_with_its_loop_is_set_again_by_a_later_event(clock: _Clock) -> None:
    hub, dispatcher = _Hub(clock), _Dispatcher()
    consumer = _consumer(hub, dispatcher)
    _event(consumer, dispatcher, "received")
    _event(consumer, dispatcher, "started")
    hub.timers.clear()  # a reconnect: the old loop's timer is gone
    clock.now += EVENT_FLUSH_SECONDS + LOST_SEND_SECONDS
    _event(consumer, dispatcher, "succeeded")
    assert dispatcher.sent == [["received"], ["started", "succeeded"]]


def test_without_a_loop_every_flush_sends(clock: _Clock) -> None:
    dispatcher = _Dispatcher()
    consumer = _consumer(None, dispatcher)
    _event(consumer, dispatcher, "received")
    _event(consumer, dispatcher, "started")
    assert dispatcher.sent == [["received"], ["started"]]

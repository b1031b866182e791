"""The worker's Celery consumer: task events sent together, at most every EVENT_FLUSH_SECONDS.

Celery buffers a worker's task events (received, started, succeeded, ...) and sends what the
buffer holds as one `task.multi` message, but it asks for that send on the event loop's next
turn after every event: at a harvest's rate most events went out as a message of their
own, a kombu publish and a Redis PUBLISH each (bench/README.md has the profile). Here the first
event after a quiet spell still goes out on the loop's next turn; the ones after it wait until
EVENT_FLUSH_SECONDS have passed since that send, and go out together. A monitor (`celery
events`, Flower) sees an event that much later at most while the broker answers; a full
buffer (Celery's 24 events) is sent at once, as before, and what waits is sent when the
connection is lost (so that Celery's reconnect carries it over) and when the consumer stops.

Set as the worker's consumer class by `worker_consumer` in core/celery_config.py.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger(__name__)

EVENT_FLUSH_SECONDS = 0.1
# A send set on the loop's timer that has not come this long after it was due is taken as
# lost (the timer outlives a reconnect, so only a loop held up that long could delay it): the
# next event sends, rather than waiting on it.
LOST_SEND_SECONDS = 1.0


class Consumer(CeleryConsumer):
    hub: Any  # kombu's Hub, Celery's event loop (None without one); absent from the stubs
    # Used from the event loop's thread only: Celery runs `_flush_events` there.
    _events_sent_at = 0.0  # monotonic() of the last send
    _send_due: float | None = None  # when the send set on the loop's timer is due

    def _flush_events(self) -> None:
        now = monotonic()
        if self._send_due is not None and now < self._send_due + LOST_SEND_SECONDS:
            return
        wait = self._events_sent_at + EVENT_FLUSH_SECONDS - now
        if wait > 0 and self.hub is not None:
            self._send_due = now + wait
            self.hub.call_later(wait, self._send_events)
            return
        self._send_events()

    def _send_events(self) -> None:
        self._send_due = None
        self._events_sent_at = monotonic()
        # Celery's own send of the buffer; private, and absent from the stubs.
        super()._flush_events()  # type: ignore[misc]

    def on_close(self) -> None:
        # The connection is lost (or the consumer stops): Celery is about to replace the event
        # dispatcher, and carries over only what the old one failed to send, not what it
        # buffers. Sent now, what waits is either sent or, the broker being gone, kept among
        # the failed sends that go out once it is back.
        self._send_pending()
        super().on_close()

    def stop(self) -> None:
        self._send_pending()
        super().stop()

    def shutdown(self) -> None:
        self._send_pending()
        super().shutdown()

    def _send_pending(self) -> None:
        """What waits on the timer, which stops with the loop (or the connection); a broker
        that is gone by then must not stop the shutdown or the reconnect."""
        if self._send_due is None:
            return
        try:
            self._send_events()
        except Exception:
            log.warning("task events not sent as the connection closed", exc_info=True)

"""gateway.celery_queue's messages are the ones Celery's own send_task would send."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest
import redis

from core.celery_config import HARVEST_TASK_NAME, make_celery
from core.settings import Settings
from gateway.celery_queue import CeleryQueue, Publication, PublishingCelery
from tests.support.services import redis_namespace

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("ignore_result", [False, True], ids=["lone upload", "batch page"])
async def test_a_published_task_is_the_message_send_task_would_send(ignore_result: bool) -> None:
    prefix = f"test-queue-{uuid.uuid4().hex[:12]}:"
    task_id = str(uuid.uuid4())
    with redis_namespace(prefix) as url:
        settings = Settings(
            celery_broker_url=url,
            celery_result_backend=url,
            redis_key_prefix=prefix,
            task_queue="harvest",
        )
        app = make_celery(settings, "test-queue", PublishingCelery)
        queue = CeleryQueue(app, publish_timeout=2.0, dependency_timeout=1.0)
        client = redis.Redis.from_url(url)
        try:
            publication = Publication(
                task_id, 7, time.monotonic() + 2.0, ignore_result=ignore_result
            )
            ours = await queue.publish_many([publication])
            assert ours == [None]
            extra: dict[str, Any] = {"ignore_result": True} if ignore_result else {}
            # What Celery's public API sends for the same task (a batch's page, as the worker
            # sends an "until known" batch's next pages: no states in the result backend).
            app.send_task(
                HARVEST_TASK_NAME,
                args=[7],
                task_id=task_id,
                retry=False,
                argsrepr="[7]",
                kwargsrepr="{}",
                **extra,
            )
            theirs_raw, ours_raw = client.lrange(f"{prefix}harvest", 0, -1)  # newest first
        finally:
            client.close()
            queue.close()

    def comparable(raw: Any) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(raw)
        properties = message["properties"]
        del properties["delivery_tag"]  # a fresh one per message, by design
        # The sending thread's id (where an rpc:// backend would answer): ours is sent from
        # the publish thread, theirs from this one.
        assert properties.pop("reply_to")
        assert message["headers"]["ignore_result"] is (True if ignore_result else None)
        return message

    assert comparable(ours_raw) == comparable(theirs_raw)


def _events(pubsub: Any, count: int) -> list[tuple[str, Any]]:
    """The next `count` event messages on the subscription: (channel, decoded body)."""
    found: list[tuple[str, Any]] = []
    deadline = time.monotonic() + 5.0
    while len(found) < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is None or message["type"] != "pmessage":
            continue
        envelope = json.loads(message["data"])
        assert envelope["properties"]["body_encoding"] == "base64"
        found.append((message["channel"].decode(), json.loads(base64.b64decode(envelope["body"]))))
    assert len(found) == count, f"{len(found)} of {count} event messages arrived"
    return found


async def test_a_batch_sends_its_task_sent_events_as_one_message_celery_reads_as_its_own() -> None:
    prefix = f"test-queue-{uuid.uuid4().hex[:12]}:"
    ids = [str(uuid.uuid4()) for _ in range(3)]
    with redis_namespace(prefix) as url:
        settings = Settings(
            celery_broker_url=url,
            celery_result_backend=url,
            redis_key_prefix=prefix,
            task_queue="harvest",
            task_events=True,
        )
        app = make_celery(settings, "test-queue", PublishingCelery)
        queue = CeleryQueue(app, publish_timeout=2.0, dependency_timeout=1.0)
        client = redis.Redis.from_url(url)
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        pubsub.psubscribe(f"{prefix}*celeryev*")
        try:
            pubsub.get_message(timeout=1.0)  # the subscription's confirmation
            deadline = time.monotonic() + 2.0
            ours = await queue.publish_many([Publication(i, 7, deadline) for i in ids])
            assert ours == [None, None, None]
            ((ours_channel, ours_body),) = _events(pubsub, 1)
            app.send_task(
                HARVEST_TASK_NAME,
                args=[7],
                task_id=ids[0],
                retry=False,
                argsrepr="[7]",
                kwargsrepr="{}",
            )
            ((theirs_channel, theirs_body),) = _events(pubsub, 1)
        finally:
            pubsub.close()
            client.close()
            queue.close()

    # One message for the batch, on the channel a worker's buffered task events use.
    assert ours_channel.endswith("celeryev/task.multi")
    assert theirs_channel.endswith("celeryev/task.sent")
    assert [event["uuid"] for event in ours_body] == ids

    def comparable(event: dict[str, Any]) -> dict[str, Any]:
        # A clock tick and a time of its own per event, by design.
        return {k: v for k, v in event.items() if k not in ("clock", "timestamp")}

    assert comparable(ours_body[0]) == comparable(theirs_body)

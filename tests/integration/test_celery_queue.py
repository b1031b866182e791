"""gateway.celery_queue's messages are the ones Celery's own send_task would send."""

from __future__ import annotations

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


async def test_a_published_task_is_the_message_send_task_would_send() -> None:
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
            ours = await queue.publish_many([Publication(task_id, 7, time.monotonic() + 2.0)])
            assert ours == [None]
            # What Celery's public API sends for the same task.
            app.send_task(
                HARVEST_TASK_NAME,
                args=[7],
                task_id=task_id,
                retry=False,
                argsrepr="[7]",
                kwargsrepr="{}",
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
        return message

    assert comparable(ours_raw) == comparable(theirs_raw)

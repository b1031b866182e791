"""The same code on the machine's real engines: Redis, RabbitMQ and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from projects.v1 import task_pb2
from tests.support.stack import Stack, upload, wait_for_task


def harvest_two_pages(stack: Stack) -> None:
    gateway = stack.start_gateway()
    stack.start_worker()
    tasks = [upload(gateway, page) for page in (1, 2)]
    finished = [wait_for_task(gateway, task.id) for task in tasks]
    assert [t.status for t in finished] == [task_pb2.TASK_STATUS_SUCCESS] * 2, [
        t.error for t in finished
    ]
    assert [t.result.created for t in finished] == [10, 10]
    assert stack.row_counts() == (20, 20)
    again = wait_for_task(gateway, upload(gateway, 1).id)
    assert (again.result.found, again.result.created, again.result.updated) == (10, 0, 0)
    assert stack.row_counts() == (20, 20)


@pytest.mark.redis
@pytest.mark.postgres
def test_machine_redis_and_postgres(machine_redis: Callable[..., Stack], postgres_url: str) -> None:
    harvest_two_pages(machine_redis(database_url=postgres_url))


@pytest.mark.rabbitmq
@pytest.mark.redis
def test_rabbitmq_broker_with_redis_results(
    machine_redis: Callable[..., Stack], rabbitmq_url: str
) -> None:
    harvest_two_pages(machine_redis(broker_url=rabbitmq_url))

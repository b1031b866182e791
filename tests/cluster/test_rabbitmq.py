"""Scenario 6 of issue 21: scenario 1 again with RabbitMQ as the broker.

The broker is a RabbitMQ node of the run's own in its own namespace (host `rabbit`; see
harness.start_rabbitmq), beside the machine's, which is never touched; Redis keeps the results.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.conftest import SHARED_SETTINGS
from tests.cluster.harness import cluster, start_rabbitmq
from tests.cluster.test_many_hosts import run_scenario_1

pytestmark = pytest.mark.timeout(600)


def test_6_scenario_1_with_rabbitmq_as_the_broker(tmp_path: Path) -> None:
    with cluster(
        tmp_path, workers=4, gateways=2, broker=start_rabbitmq, settings=SHARED_SETTINGS
    ) as c:
        assert c.env["CELERY_BROKER_URL"].startswith("amqp://")
        run_scenario_1(c, "6. scenario 1 with RabbitMQ (a node of its own) as the broker")

"""Cluster-suite fixtures: root and iproute2 checked, the scenario report printed at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster.harness import Cluster, ClusterError, cluster, require_tools
from tests.faults.ledger import REPORT
from tests.support.services import in_ci


@pytest.fixture(autouse=True)
def _namespaces_possible() -> None:
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("the cluster suite needs root (ip netns), and CI=true requires it")
        pytest.skip("the cluster suite needs root (ip netns)")
    try:
        require_tools()
    except ClusterError as error:
        if in_ci():
            pytest.fail(str(error))
        pytest.skip(str(error))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("cluster scenarios: what each did and counted")
        for line in REPORT:
            terminalreporter.write_line(line)


# One cluster for the scenarios that can share it (bringing 9 hosts up is a minute on a loaded
# machine): short timeouts so a host that vanished has its tasks delivered again within seconds.
SHARED_SETTINGS = {
    "BROKER_VISIBILITY_TIMEOUT_SECONDS": "15",
    "TASK_SOFT_TIME_LIMIT_SECONDS": "8",
    "TASK_TIME_LIMIT_SECONDS": "10",
    "FETCH_TIMEOUT_SECONDS": "5",
    "RETRY_AFTER_CAP_SECONDS": "2",
    "RETRY_MAX_DELAY_SECONDS": "1",
}


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster(
        tmp_path_factory.mktemp("cluster"), workers=4, gateways=2, settings=SHARED_SETTINGS
    ) as c:
        try:
            yield c
        finally:
            if failures[0]:
                print(c.logs()[-200_000:])


failures = [0]


@pytest.fixture
def hosts(shared_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The shared cluster, reset for this scenario: every host up and serving, tables empty."""
    shared_cluster.reset()
    failed_before = request.session.testsfailed
    yield shared_cluster
    if request.session.testsfailed > failed_before:
        failures[0] += 1

"""Cluster-suite fixtures: root and iproute2 checked, the scenario report printed at the end."""

from __future__ import annotations

import os

import pytest

from tests.cluster.harness import ClusterError, require_tools
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

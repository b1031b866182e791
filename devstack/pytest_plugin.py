"""The `harvester_stack` pytest fixture (found through the `pytest11` entry point once
projects-harvester is installed): one running harvester for the whole test session.

    def test_my_service_reads_projects(harvester_stack):
        harvester_stack.site.set_projects(1, [...])
        harvester_stack.client.wait(harvester_stack.client.upload(1).id, timeout=30)

Session-scoped, since starting it takes seconds: tests share its database (use pages and
request_ids of their own; `site.reset()` forgets what a test scripted). Its processes' logs
are printed when a test of the session failed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.testing import HarvesterStack
from devstack.testing import harvester_stack as start_harvester_stack


@pytest.fixture(scope="session")
def harvester_stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[HarvesterStack]:
    """A running harvester (gateway, worker, embedded broker, SQLite, scriptable sample site)
    with a token and a ready client; stopped at the end of the session."""
    with start_harvester_stack(tmp_path_factory.mktemp("harvester")) as stack:
        yield stack
        if request.session.testsfailed:
            print(stack.logs())

"""harvester.Client and AsyncClient against the real service, started by the harvester_stack
pytest fixture (devstack.pytest_plugin) exactly as another team's tests would start it."""

from __future__ import annotations

import itertools

import grpc
import pytest

from devstack.testing import HarvesterStack
from harvester import (
    AsyncClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from projects.v1 import project_pb2, task_pb2
from tests.support.listings import own_projects

# Pages of this module's own on the shared stack (the sample site's are 1-20).
PAGES = itertools.count(1000)


def test_upload_wait_status_and_tasks(harvester_stack: HarvesterStack) -> None:
    client = harvester_stack.client
    page = next(PAGES)
    harvester_stack.site.set_projects(page, own_projects(7))
    task = client.upload(page)
    assert task.status == task_pb2.TASK_STATUS_PENDING and task.page == page
    done = client.wait(task.id, timeout=60)
    assert isinstance(done, task_pb2.Task)
    assert done.status == task_pb2.TASK_STATUS_SUCCESS, done.error
    assert (done.result.found, done.result.created, done.result.updated) == (7, 7, 0)
    assert client.status(task.id) == done
    assert harvester_stack.site.hits()[page] == 1
    listed = [t for t in client.tasks(limit=20) if t.id == task.id]
    assert listed == [done]


def test_a_batch_is_waited_for_and_a_finished_one_cannot_be_cancelled(
    harvester_stack: HarvesterStack,
) -> None:
    client = harvester_stack.client
    first = next(PAGES)
    pages = [first, next(PAGES), next(PAGES)]
    for page in pages:
        harvester_stack.site.set_projects(page, own_projects(4))
    batch = client.upload_pages(pages[0], pages[-1])
    done = client.wait(batch.id, timeout=60)
    assert isinstance(done, task_pb2.Batch)
    assert done.status == task_pb2.TASK_STATUS_SUCCESS, done.error
    assert (done.pages_total, done.pages_succeeded) == (3, 3)
    assert (done.totals.found, done.totals.created) == (12, 12)
    page_tasks = list(client.tasks(batch_id=batch.id))
    assert sorted(t.page for t in page_tasks) == pages
    with pytest.raises(FailedPrecondition):
        client.cancel(batch.id)


def test_list_projects_follows_page_tokens_over_every_filtered_project(
    harvester_stack: HarvesterStack,
) -> None:
    client = harvester_stack.client
    page = next(PAGES)
    mine = own_projects(9)
    tag = mine[0].href.split("/")[2]
    harvester_stack.site.set_projects(page, mine)
    client.wait(client.upload(page).id, timeout=60)
    found = list(client.list_projects(query=tag, order_by="url", page_size=2))
    assert sorted(p.url for p in found) == sorted(
        f"{harvester_stack.site.url}{p.href}" for p in mine
    )
    assert [p.url for p in found] == sorted(p.url for p in found)
    active = list(client.list_projects(query=tag, is_active=True, page_size=2))
    assert {p.title for p in active} == {p.title for p in mine if p.is_active}
    assert len(list(client.list_projects(query=tag, limit=3, page_size=2))) == 3


def test_errors_arrive_as_the_clients_own(harvester_stack: HarvesterStack) -> None:
    client = harvester_stack.client
    with pytest.raises(InvalidArgument) as caught:
        client.upload(0)
    assert caught.value.field_violations[0].field == "page"
    with pytest.raises(NotFound):
        client.status("00000000-0000-4000-8000-000000000000")
    with (
        harvester_stack.new_client(token="not-a-token") as stranger,
        pytest.raises(Unauthenticated) as refused,
    ):
        stranger.upload(1)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_the_async_client_uploads_waits_and_watches(
    harvester_stack: HarvesterStack,
) -> None:
    first, second = next(PAGES), next(PAGES)
    earlier = own_projects(3)
    harvester_stack.site.set_projects(first, earlier)
    last_of_first = f"{harvester_stack.site.url}{earlier[-1].href}"
    later = own_projects(5)
    harvester_stack.site.set_projects(second, later)
    async with AsyncClient(harvester_stack.address, harvester_stack.token) as client:
        done = await client.wait((await client.upload(first)).id, timeout=60)
        assert done.status == task_pb2.TASK_STATUS_SUCCESS
        # A cursor from the first page's changes; the watch from it must bring the second's.
        cursor = None
        async for change in client.watch_projects(from_beginning=True):
            if change.project.url == last_of_first and change.cursor:
                cursor = change.cursor
                break
        assert cursor is not None
        await client.wait((await client.upload(second)).id, timeout=60)
        wanted = {f"{harvester_stack.site.url}{p.href}" for p in later}
        seen: list[str] = []
        async for change in client.watch_projects(cursor):
            assert change.change_type == project_pb2.CHANGE_TYPE_CREATED
            seen.append(change.project.url)
            if wanted <= set(seen):
                break
        assert sorted(seen) == sorted(wanted)

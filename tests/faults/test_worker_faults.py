"""Scenarios 4, 6, 7, 10 and 11: concurrent writers, a poison page, a task that outlives its
visibility timeout, a misbehaving source, and load."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from projects.v1 import task_pb2
from tests.conftest import StackFactory
from tests.faults.conftest import FAST_FAILURE
from tests.faults.ledger import Ledger, record, sample_links
from tests.support.processes import Process, RedisServer, poll_until
from tests.support.stack import Stack, get_status

HTML = {"Content-Type": "text/html; charset=utf-8"}


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_two_workers_overlapping_pages(
    make_stack: StackFactory,
    own_redis: RedisServer,
    ledger_for: Callable[[Stack], Ledger],
    request: pytest.FixtureRequest,
    database: str,
) -> None:
    database_url = request.getfixturevalue("postgres_url") if database == "postgres" else None
    stack = make_stack(broker_url=own_redis.url, database_url=database_url, **FAST_FAILURE)
    gateway = stack.start_gateway()
    stack.start_worker("worker-a", concurrency=2)
    stack.start_worker("worker-b", concurrency=2)
    ledger = ledger_for(stack)
    pages = [1, 2, 3, 4, 5, 6, 7, 8]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: ledger.upload(gateway, pages[n % 8], f"overlap-{n}"), range(32)))
    ledger.settle(gateway, 120)
    counts = ledger.count(sample_links(stack.site.url, pages))
    retried_locks = sum(
        p.output().count("database busy") for p in stack.processes if p.name.startswith("worker")
    )
    record(
        f"4. two workers x concurrency 2, overlapping pages ({database})",
        f"32 Uploads over 8 pages; {retried_locks} lock/serialization retries seen",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.success == 32, [t.error for t in ledger.final.values() if t.error]


def supervise(stack: Stack, name: str, deaths: list[int], **env: str) -> Callable[[], Process]:
    """Start a worker; the returned function restarts it when it has died (as systemd would)."""
    current = [stack.start_worker(name, concurrency=1, **env)]

    def check() -> Process:
        if current[0].popen.poll() is not None:
            deaths.append(current[0].popen.returncode)
            current[0] = stack.start_worker(f"{name}-{len(deaths)}", concurrency=1, **env)
        return current[0]

    return check


def test_poison_page_fails_after_bounded_attempts(
    fault_stack: Callable[..., Stack], ledger_for: Callable[[Stack], Ledger]
) -> None:
    stack = fault_stack()
    gateway = stack.start_gateway()
    deaths: list[int] = []
    restart_if_dead = supervise(stack, "worker", deaths, FAILPOINTS="before_fetch=crash@7")
    ledger = ledger_for(stack)
    for page in (1, 7, 2):
        ledger.upload(gateway, page, f"poison-{page}")

    def settled() -> bool:
        restart_if_dead()
        ledger.settle(gateway, 0.5)
        return len(ledger.final) == 3

    poll_until(settled, 180, 0.5, "the poison task to be given up")
    counts = ledger.count(sample_links(stack.site.url, [1, 2]))
    poison = ledger.final["poison-7"]
    record(
        "6. poison page",
        f"page 7 kills its worker every time; worker restarted {len(deaths)} times; page 7 -> "
        f"{task_pb2.TaskStatus.Name(poison.status)} ({poison.error!r})",
        counts,
    )
    assert poison.status == task_pb2.TASK_STATUS_FAILURE and "died" in poison.error
    assert len(deaths) <= 4, "the poison task was delivered without bound"
    assert counts.lost == 0 and counts.duplicated == 0 and counts.success == 2


def test_task_outliving_the_visibility_timeout(
    fault_stack: Callable[..., Stack], ledger_for: Callable[[Stack], Ledger]
) -> None:
    stack = fault_stack()
    gateway = stack.start_gateway()
    slow = stack.start_worker("stalled", concurrency=1)
    ledger = ledger_for(stack)
    ledger.upload(gateway, 1, "outlive-1")
    poll_until(
        lambda: (
            get_status(gateway, ledger.accepted["outlive-1"]).status != task_pb2.TASK_STATUS_PENDING
        ),
        30,
        0.02,
        "the task to start",
    )
    # A stalled host: the worker holds the task far past the visibility timeout (8 s).
    slow.send(signal.SIGSTOP)
    for page in (2, 3, 4):  # the backlog behind it
        ledger.upload(gateway, page, f"outlive-{page}")
    stack.start_worker("rescuer", concurrency=2)
    poll_until(
        lambda: (
            get_status(gateway, ledger.accepted["outlive-1"]).status == task_pb2.TASK_STATUS_SUCCESS
        ),
        60,
        0.2,
        "the redelivered copy to succeed",
    )
    slow.send(signal.SIGCONT)  # the stalled copy wakes up and finishes, or fails, late
    ledger.settle(gateway, 60)
    states = []
    for _ in range(20):  # and the state it left stays SUCCESS
        states.append(get_status(gateway, ledger.accepted["outlive-1"]).status)
    counts = ledger.count(sample_links(stack.site.url, [1, 2, 3, 4]))
    record(
        "7. task outlives the visibility timeout",
        "worker SIGSTOPped holding page 1 past the 8 s timeout while 3 pages waited; the copy "
        "ran elsewhere; after SIGCONT page 1 reads "
        f"{sorted({task_pb2.TaskStatus.Name(s) for s in states})}",
        counts,
    )
    assert set(states) == {task_pb2.TASK_STATUS_SUCCESS}
    assert counts.lost == 0 and counts.duplicated == 0 and counts.success == 4


SOURCE_CASES: dict[str, tuple[list[dict[str, object]], str]] = {
    "slow": ([{"status": 200, "headers": HTML, "body": "", "delay": 5}] * 10, "did not answer"),
    "429 Retry-After": ([{"status": 429, "headers": {"Retry-After": "1"}}], ""),
    "503": ([{"status": 503}, {"status": 503}], ""),
    "redirect loop": (
        [{"status": 302, "headers": {"Location": "/projects?page={page}"}}] * 40,
        "redirects",
    ),
    "redirect off host": (
        [{"status": 302, "headers": {"Location": "http://localhost:9/elsewhere"}}],
        "refused to follow a redirect",
    ),
    "over the size limit": (
        [{"status": 200, "headers": HTML, "body": "x" * 300_000}],
        "larger than",
    ),
    "not HTML": (
        [{"status": 200, "headers": {"Content-Type": "application/json"}, "body": "{}"}],
        "not an HTML",
    ),
}


def with_page(headers: object, page: int) -> dict[str, str]:
    assert isinstance(headers, dict) or headers is None
    return {k: str(v).replace("{page}", str(page)) for k, v in (headers or {}).items()}


def test_misbehaving_source(
    fault_stack: Callable[..., Stack], ledger_for: Callable[[Stack], Ledger]
) -> None:
    stack = fault_stack(FETCH_MAX_BYTES="200000", RETRY_MAX_TRIES="3")
    gateway = stack.start_gateway()
    stack.start_worker(concurrency=4)
    ledger = ledger_for(stack)
    pages = {}
    for page, (name, (script, _)) in enumerate(SOURCE_CASES.items(), start=1):
        responses = [{**r, "headers": with_page(r.get("headers"), page)} for r in script]
        stack.site.script(page, responses)
        pages[name] = page
        ledger.upload(gateway, page, f"source-{page}")
    shift_jis = (
        "<html><head><meta charset='shift_jis'></head><body><article class='project'>"
        "<h2 class='project-title'><a href='/p/jp'>日本のプロジェクト</a></h2>"
        "</article></body></html>"
    )
    stack.site.set_page(99, shift_jis.encode("shift_jis"), content_type="text/html")
    ledger.upload(gateway, 99, "source-99")
    ledger.settle(gateway, 120)
    hits = stack.site.hits()
    outcomes = []
    for name, (_, expected_error) in SOURCE_CASES.items():
        task = ledger.final[f"source-{pages[name]}"]
        outcomes.append(
            f"{name}: {task_pb2.TaskStatus.Name(task.status)[12:]} in {hits.get(pages[name])} tries"
        )
        if expected_error:
            assert task.status == task_pb2.TASK_STATUS_FAILURE and expected_error in task.error, (
                name,
                task,
            )
        else:
            assert task.status == task_pb2.TASK_STATUS_SUCCESS, (name, task.error)
        assert hits.get(pages[name], 0) <= 3 * 41, name  # bounded tries (redirects counted)
    assert stack.projects()[f"{stack.site.url}/p/jp"].title == "日本のプロジェクト"
    counts = ledger.count(set())
    record(
        "10. misbehaving source",
        "; ".join(outcomes) + "; Shift-JIS with only a meta charset: parsed",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0


@pytest.mark.timeout(480)
def test_load_2000_uploads(
    fault_stack: Callable[..., Stack], ledger_for: Callable[[Stack], Ledger]
) -> None:
    # Load, not failure: the production time limits, so a busy machine is not mistaken for a
    # hung task.
    stack = fault_stack(
        TASK_SOFT_TIME_LIMIT_SECONDS="60",
        TASK_TIME_LIMIT_SECONDS="90",
        FETCH_TIMEOUT_SECONDS="10",
        BROKER_VISIBILITY_TIMEOUT_SECONDS="200",
    )
    gateway = stack.start_gateway()
    stack.start_worker("worker-a", concurrency=8)
    stack.start_worker("worker-b", concurrency=8)
    ledger = ledger_for(stack)
    gateway_process = psutil.Process(gateway.process.pid)
    rss: dict[int, float] = {}
    errors: list[str] = []
    run = uuid.uuid4().hex[:6]

    def client(number: int) -> None:
        for n in range(number, 2000, 32):
            try:
                ledger.upload(gateway, n % 20 + 1, f"load-{run}-{n}")
            except Exception as error:  # counted, and the test fails on any
                errors.append(repr(error))
            if n in (199, 1999):
                rss[n + 1] = gateway_process.memory_info().rss / 2**20

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(client, range(32)))
    rss.setdefault(2000, gateway_process.memory_info().rss / 2**20)
    ledger.settle(gateway, 300)
    counts = ledger.count(sample_links(stack.site.url, list(range(1, 21))))
    record(
        "11. load",
        f"2000 Uploads from 32 clients, 2 workers x 8: {len(errors)} errors; gateway RSS "
        f"{rss.get(200, 0):.1f} MiB at 200 calls, {rss[2000]:.1f} MiB at 2000",
        counts,
    )
    assert not errors, errors[:3]
    assert counts.success == 2000 and counts.lost == 0 and counts.duplicated == 0
    assert rss[2000] <= rss[200] * 1.25, rss

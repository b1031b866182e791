"""Issue 21's scenarios on one shared cluster: 2 gateways, 4 worker hosts, redis, pg, the site.

Each is counted by the fault ledger (tests/faults/ledger.py): 0 lost, 0 duplicated, rows
exactly the links of the pages it accepted.

1. 2,000 Uploads, one per page, spread over both gateways by 16 clients (8 each, every one its
   own connection); then GetStatus of every task through the gateway it was *not* uploaded on
   (task records live in the database both share, not in a gateway).
2. A worker's host cut off (its link down) while it holds tasks, for longer than the broker's
   visibility timeout, then back: the other hosts get those tasks again; the comeback of the
   first does not store anything twice.
3. A gateway's host cut off from Redis while serving: its Uploads answer UNAVAILABLE within
   their deadline, its health says NOT_SERVING, the other gateway goes on serving.
5. PostgreSQL restarted mid-harvest: the workers' writes fail, are retried, and land once.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from projects.v1 import queue_service_pb2
from tests.cluster.conftest import SHARED_SETTINGS
from tests.cluster.harness import Cluster
from tests.cluster.scenarios import clients, close_clients, settle_through
from tests.faults.ledger import Ledger, record, sample_links
from tests.support.processes import poll_until
from tests.support.stack import TEST_TOKEN, health_status, wait_for_health

pytestmark = pytest.mark.timeout(600)

UPLOADS = 2000
CLIENTS = 16
VISIBILITY = float(SHARED_SETTINGS["BROKER_VISIBILITY_TIMEOUT_SECONDS"])


def tasks_done(c: Cluster, host: str) -> int:
    return c.workers[host].output().count("succeeded in")


def test_1_2000_uploads_over_two_gateways_four_workers(hosts: Cluster) -> None:
    run_scenario_1(hosts, "1. 2 gateways x 16 clients, 4 worker hosts")


def run_scenario_1(c: Cluster, scenario: str) -> None:
    c.site.behave(pages=UPLOADS)
    gw1, gw2 = c.gateways["gw1"], c.gateways["gw2"]
    done_before = {h: tasks_done(c, h) for h in c.workers}
    made = clients(gw1, CLIENTS // 2) + clients(gw2, CLIENTS // 2)
    ledger = Ledger(c.stack)
    uploaded_on: dict[str, str] = {}

    def client_run(n: int) -> None:
        client = made[n]
        for page in range(n + 1, UPLOADS + 1, CLIENTS):
            ledger.upload(client, page, f"s1-{page}")
            uploaded_on[f"s1-{page}"] = client.address

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client_run, range(CLIENTS)))
        accepted_in = time.monotonic() - started
        other = {gw1.address: gw2, gw2.address: gw1}
        errors = settle_through(ledger, lambda rid: other[uploaded_on[rid]], 480)
    finally:
        close_clients(made)
    elapsed = time.monotonic() - started
    counts = ledger.count(sample_links(c.site.url, list(range(1, UPLOADS + 1))))
    per_worker = {h: tasks_done(c, h) - done_before[h] for h in c.workers}
    record(
        scenario,
        f"{UPLOADS} Uploads accepted in {accepted_in:.1f} s, all settled in {elapsed:.1f} s; "
        f"GetStatus through the other gateway (failed calls: {errors}); tasks per worker "
        f"{per_worker}",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0, counts
    assert counts.success == UPLOADS and counts.rows == UPLOADS * 10, counts
    assert all(n > 0 for n in per_worker.values()), per_worker


def test_2_worker_host_cut_off_past_the_visibility_timeout(hosts: Cluster) -> None:
    c = hosts
    pages = list(range(1, 41))
    c.site.behave(pages=len(pages), delay=1.0)  # tasks stay in flight for a while
    gw1 = c.gateways["gw1"]
    ledger = Ledger(c.stack)
    received_before = c.workers["w1"].output().count("received")
    for page in pages:
        ledger.upload(gw1, page, f"s2-{page}")
    poll_until(
        lambda: c.workers["w1"].output().count("received") > received_before + 1,
        60,
        what="w1 to take tasks",
    )
    held = c.workers["w1"].output().count("received") - received_before
    cut_at = time.monotonic()
    c.net.link_down("w1")
    # The fault itself lasts this long: the broker gives w1's tasks to others only after it.
    poll_until(lambda: time.monotonic() - cut_at > VISIBILITY + 5, VISIBILITY + 30, 0.5, "the cut")
    c.net.link_up("w1")
    settle_through(ledger, lambda rid: gw1, 240)
    counts = ledger.count(sample_links(c.site.url, pages))
    hits = c.site.hits()
    fetched_twice = sum(1 for page in pages if hits.get(page, 0) > 1)
    record(
        "2. worker host w1 cut off (link down) for visibility timeout + 5 s",
        f"40 Uploads, 1 s pages; w1 had taken {held} when cut; "
        f"{fetched_twice} pages fetched more than once",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0, counts
    assert counts.success == len(pages) and counts.rows == len(pages) * 10, counts


def test_3_gateway_cut_off_from_redis(hosts: Cluster) -> None:
    c = hosts
    c.site.behave(pages=60)
    gw1, gw2 = c.gateways["gw1"], c.gateways["gw2"]
    ledger = Ledger(c.stack)
    for page in range(1, 11):
        ledger.upload(gw1, page, f"s3-{page}")
    c.net.partition("gw1", "redis")
    deadline = 8.0
    answers: list[tuple[str, float]] = []
    for page in range(41, 46):
        started = time.monotonic()
        try:
            gw1.stub.Upload(
                queue_service_pb2.UploadRequest(page=page, request_id=f"s3-cut-{page}"),
                metadata=(("authorization", f"Bearer {TEST_TOKEN}"),),
                timeout=deadline,
            )
            answers.append(("OK", time.monotonic() - started))
        except grpc.RpcError as error:
            answers.append((error.code().name, time.monotonic() - started))
    wait_for_health(gw1.address, health_pb2.HealthCheckResponse.NOT_SERVING, 30)
    for page in range(11, 31):  # the other gateway goes on serving meanwhile
        ledger.upload(gw2, page, f"s3-{page}")
    assert health_status(gw2.address) == health_pb2.HealthCheckResponse.SERVING
    c.net.heal("gw1", "redis")
    wait_for_health(gw1.address, health_pb2.HealthCheckResponse.SERVING, 30)
    for page in range(31, 41):
        ledger.upload(gw1, page, f"s3-{page}")
    settle_through(ledger, lambda rid: gw2, 240)
    counts = ledger.count(sample_links(c.site.url, list(range(1, 41))))
    record(
        "3. gateway gw1 cut off from redis",
        f"Uploads to gw1 while cut: {[(code, round(s, 2)) for code, s in answers]} "
        f"(deadline {deadline} s); gw1 NOT_SERVING, gw2 took 20 Uploads; healed, gw1 took 10",
        counts,
    )
    assert all(code == "UNAVAILABLE" and took < deadline for code, took in answers), answers
    assert counts.lost == 0 and counts.duplicated == 0, counts
    # Rows exact: no Upload that answered UNAVAILABLE was harvested after all.
    assert counts.success == 40 and counts.rows == 400, counts


def test_5_postgres_restarted_mid_harvest(hosts: Cluster) -> None:
    c = hosts
    pages = list(range(1, 101))
    # 16 pages at a time, each 2 s: the restart lands with most of the harvest still to come.
    c.site.behave(pages=len(pages), delay=2.0)
    gw1, gw2 = c.gateways["gw1"], c.gateways["gw2"]
    ledger = Ledger(c.stack)
    for page in pages:
        ledger.upload(gw1 if page % 2 else gw2, page, f"s5-{page}")
    poll_until(lambda: c.stack.row_counts()[0] >= 100, 120, 0.1, "10 pages stored")
    stored_at_restart = c.stack.row_counts()[0]
    c.postgres.stop()  # immediate: connections cut, no checkpoint
    c.postgres.start()
    settle_through(ledger, lambda rid: gw2, 300)
    counts = ledger.count(sample_links(c.site.url, pages))
    retried = sum(p.output().count("retry") for p in c.workers.values())
    record(
        "5. PostgreSQL restarted (immediate stop, start) mid-harvest",
        f"100 Uploads; {stored_at_restart // 10} pages stored at the restart; "
        f"{retried} worker log lines mention a retry",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0, counts
    assert counts.success == len(pages) and counts.rows == len(pages) * 10, counts

"""Scenario 4 of issue 21: 200 ms delay and 5% loss on the workers' links during a 100-page
harvest, counted by the fault ledger.

The delay and loss are not tc netem's: this machine's kernel has no CONFIG_NET_SCH_NETEM ("Specified
qdisc kind is unknown"). Each worker host's only link is then a TUN device whose packets a
user-space forwarder (tests/cluster/slowlink.py) passes to the router host after 200 ms, each
way, dropping 5% at random, each way.
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.harness import Cluster
from tests.cluster.scenarios import settle_through
from tests.faults.ledger import Ledger, record, sample_links

pytestmark = pytest.mark.timeout(600)

DELAY, LOSS = 0.2, 0.05
# A round trip is 400 ms and a lost segment costs a retransmission timeout: the workers' bounds
# on a database connect, a fetch and a task are widened to what this link needs, and the
# visibility timeout above the task's limit again.
SLOW_LINK_WORKER = {
    "DEPENDENCY_TIMEOUT_SECONDS": "15",
    "PUBLISH_TIMEOUT_SECONDS": "30",  # the settings hold it at twice the dependency bound
    "FETCH_TIMEOUT_SECONDS": "30",
    "SOURCE_LEASE_SECONDS": "40",  # the settings hold a source lease above the fetch bound
    "TASK_SOFT_TIME_LIMIT_SECONDS": "80",
    "TASK_TIME_LIMIT_SECONDS": "90",
    "BROKER_VISIBILITY_TIMEOUT_SECONDS": "180",
}


def test_4_delay_and_loss_on_worker_links(hosts: Cluster) -> None:
    c = hosts
    pages = list(range(1, 101))
    c.site.behave(pages=len(pages))
    for host in list(c.workers):
        c.stop_worker(host)
    gw1, gw2 = c.gateways["gw1"], c.gateways["gw2"]
    ledger = Ledger(c.stack)
    with c.slow_links(c.worker_hosts, DELAY, LOSS):
        started = time.monotonic()
        for host in c.worker_hosts:
            c.start_worker(host, c.concurrency, ready=False, **SLOW_LINK_WORKER)
        for host in c.worker_hosts:
            c.workers[host].wait_for_line(r"ready\.", 120)
        ready_in = time.monotonic() - started
        for page in pages:
            ledger.upload(gw1 if page % 2 else gw2, page, f"s4-{page}")
        settle_through(ledger, lambda rid: gw2, 420)
        elapsed = time.monotonic() - started
        for host in list(c.workers):
            c.stop_worker(host)
    counts = ledger.count(sample_links(c.site.url, pages))
    record(
        f"4. {DELAY * 1000:.0f} ms delay + {LOSS:.0%} loss each way on the 4 workers' links "
        "(user-space TUN link: no netem in this kernel)",
        f"100 pages; workers ready in {ready_in:.1f} s over the slow links; "
        f"all settled {elapsed:.1f} s after the workers started",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0, counts
    assert counts.success == len(pages) and counts.rows == len(pages) * 10, counts

"""The harness leaves nothing behind: not when a run is interrupted, not when it was killed.

A child pytest brings a cluster up (tests/cluster/child_cluster.py); the parent interrupts it
with SIGINT (Ctrl-C, as a developer or a CI runner would) or kills it with SIGKILL, then looks
for what the child's run made: its namespaces, links (the bridge, the veth pairs) and processes.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster import network
from tests.support.processes import PYTHON, Process, clean_environment, poll_until

CHILD = Path(__file__).with_name("child_cluster.py")


def start_child(directory: Path) -> tuple[Process, list[int]]:
    args = [PYTHON, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", str(CHILD)]
    child = Process("child-pytest", args, clean_environment({}), directory)
    up = child.wait_for_line(r"cluster up; processes ([\d ]+); postgres (\d+)", 120)
    pids = [int(p) for p in up.group(1).split()] + [int(up.group(2))]
    assert network.leftovers_of(child.pid), "the child's cluster made no namespace"
    return child, pids


def all_gone(pids: list[int]) -> bool:
    return not [pid for pid in pids if psutil.pid_exists(pid)]


# The child's teardown may take this long by the harness's own bounds: each of its 4
# processes (redis, site, a gateway, a worker) is given 10 s to stop and 5 s more once killed.
TEARDOWN_BOUND_SECONDS = 4 * (10 + 5) + 30


@pytest.mark.timeout(120 + TEARDOWN_BOUND_SECONDS)
def test_interrupted_run_removes_everything_it_made(tmp_path: Path) -> None:
    child, pids = start_child(tmp_path)
    child.send(signal.SIGINT)
    try:
        code = child.popen.wait(TEARDOWN_BOUND_SECONDS)
    except subprocess.TimeoutExpired:
        child.send(signal.SIGUSR1)  # the child's stacks, where its teardown waits
        time.sleep(1)
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        child.stop()
        raise AssertionError(
            f"the interrupted child did not end within {TEARDOWN_BOUND_SECONDS} s; "
            f"of its cluster's processes {alive} were alive; its output:\n{child.output()}"
        ) from None
    child.stop()
    assert code != 0, child.output()  # interrupted, not passed
    assert network.leftovers_of(child.pid) == [], child.output()
    poll_until(lambda: all_gone(pids), 10, what=f"the cluster's processes {pids} to exit")


def test_killed_run_is_cleaned_at_the_next_start(tmp_path: Path) -> None:
    child, pids = start_child(tmp_path)
    child.send(signal.SIGKILL)
    child.popen.wait(30)
    child.stop()
    left = network.leftovers_of(child.pid)
    assert left, "a SIGKILLed run cleaned up after itself: the test shows nothing"
    assert child.pid in network.remove_leftovers()
    assert network.leftovers_of(child.pid) == []
    poll_until(lambda: all_gone(pids), 10, what=f"the cluster's processes {pids} to exit")

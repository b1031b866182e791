"""The harness leaves nothing behind: not when a run is interrupted, not when it was killed.

A child pytest brings a cluster up (tests/cluster/child_cluster.py); the parent interrupts it
with SIGINT (Ctrl-C, as a developer or a CI runner would) or kills it with SIGKILL, then looks
for what the child's run made: its namespaces, links (the bridge, the veth pairs) and processes.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil

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


def test_interrupted_run_removes_everything_it_made(tmp_path: Path) -> None:
    child, pids = start_child(tmp_path)
    child.send(signal.SIGINT)
    code = child.popen.wait(60)
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

"""Run only by test_teardown.py, in a child pytest: a cluster that is up until it is interrupted.

Not named test_*.py, so a plain `pytest tests/cluster` does not collect it.
"""

from __future__ import annotations

import faulthandler
import signal
import threading
from pathlib import Path

from tests.cluster.harness import cluster


def test_cluster_until_interrupted(tmp_path: Path) -> None:
    # Started by a pytest that a non-interactive shell ran in the background (a CI runner's
    # `make ... &`), this process inherits SIGINT ignored, and Python then leaves it ignored:
    # the parent's Ctrl-C would never arrive. Ctrl-C at a terminal is what is played here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # The parent asks for every thread's stack with SIGUSR1 when the teardown takes too long.
    faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
    with cluster(tmp_path, workers=1, gateways=1) as c:
        pids = " ".join(str(p.pid) for p in c.processes)
        print(f"cluster up; processes {pids}; postgres {c.postmaster_pid()}", flush=True)
        # The parent interrupts us here (SIGINT) or kills us (SIGKILL); nothing to time.
        threading.Event().wait(300)
    raise AssertionError("not interrupted within 300 s")

"""Failpoints: named places in the harvest where the fault tests make a worker stop or die.

FAILPOINTS (a setting, empty in production) is a comma-separated list of `point=action` or
`point=action@page`. Points: `before_fetch` (the task started, nothing fetched yet) and
`after_store` (the page is committed to the database, the task not yet acknowledged).
Actions: `pause` writes `DATA_DIR/failpoint-<point>-<pid>` and sleeps for good, so a test can
kill the process at exactly that point; `crash` kills the process on the spot (SIGKILL), as an
out-of-memory kill would; `raise` raises an error the task's own code does not handle, as a
bug would.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger(__name__)

POINTS = ("before_fetch", "after_store")
ACTIONS = ("pause", "crash", "raise")


class FailpointError(RuntimeError):
    """What the `raise` action raises: an error no handler of the task expects."""


def parse(spec: str) -> dict[str, tuple[str, int | None]]:
    """{point: (action, page or None)}; ValueError naming what is wrong."""
    failpoints: dict[str, tuple[str, int | None]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        point, _, rest = entry.partition("=")
        action, _, page = rest.partition("@")
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"FAILPOINTS entry {entry!r}: use {POINTS} = {ACTIONS} [@page]")
        failpoints[point] = (action, int(page) if page else None)
    return failpoints


def hit(spec: str, point: str, page: int, data_dir: Path) -> None:
    """Act on `point` if FAILPOINTS names it (for this page); otherwise return at once."""
    if not spec:
        return
    action, only_page = parse(spec).get(point, ("", None))
    if not action or (only_page is not None and only_page != page):
        return
    log.warning("failpoint %s: %s on page %d", point, action, page)
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        raise FailpointError(f"failpoint {point} on page {page}")
    marker = data_dir / f"failpoint-{point}-{os.getpid()}"
    marker.write_text(str(page))
    threading.Event().wait()  # paused until the test kills the process

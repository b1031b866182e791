"""A real terminal for tests of the command as a person uses it: tmux, on a server of its own.

`Terminal.type` sends keys as typed, `screen` is what capture-pane shows now, and `wait_for`
waits (with a deadline) until the screen matches. With CI=true a missing tmux is installed from
Debian (apt-get install -y tmux) or fails the test; elsewhere the test is skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping

import pytest

from tests.support.services import in_ci


def tmux_or_skip() -> str:
    found = shutil.which("tmux")
    if found is None and in_ci() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "tmux"], check=False, capture_output=True)
        found = shutil.which("tmux")
    if found is None:
        if in_ci():
            pytest.fail("tmux is missing and could not be installed (apt-get install -y tmux)")
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    return found


class Terminal:
    def __init__(self, env: Mapping[str, str], width: int = 160, height: int = 40) -> None:
        self._tmux = tmux_or_skip()
        # A tmux server of this test's own (-L): nobody else's sessions are touched.
        self._socket = f"harvester-test-{uuid.uuid4().hex[:8]}"
        variables = [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]
        self._run("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), *variables)

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [self._tmux, "-L", self._socket, *args], check=True, capture_output=True, text=True
        )
        return done.stdout

    def type(self, *keys: str) -> None:
        self._run("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", "t")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if match := regex.search(screen):
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(f"the terminal never showed {pattern!r}; it shows:\n{screen}")
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run([self._tmux, "-L", self._socket, "kill-server"], check=False)

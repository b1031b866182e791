"""The harvester as a fixture for other teams' integration tests: `harvester_stack()`.

    from devstack.testing import harvester_stack

    with harvester_stack(tmp_path) as stack:
        stack.site.set_projects(1, [ListedProject("A bot", "/p/1", "made up", True, None)])
        task = stack.client.upload(1)
        assert stack.client.wait(task.id, timeout=30).result.created == 1

It starts the whole service as `make run` would, but on free ports and in a directory of its
own: the embedded Redis broker (a Unix socket), a SQLite database, a scriptable sample site,
the gateway and one worker, each a real process; it returns once the gateway's health check
passes, with a token and a ready `harvester.Client`, and stops everything on the way out
(also when the test failed). pytest users get the same as the `harvester_stack` fixture
(devstack.pytest_plugin, found by pytest through its entry point).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core import embedded_redis
from core.settings import Settings
from harvester import Client
from harvester.errors import HarvesterError
from sample_site.pages import SampleProject, render_listing
from sample_site.server import SERVE_CONTENT_TYPE_HEADER

# A project as the sample site lists it (title, href, description, is_active, start_date).
ListedProject = SampleProject

BIN = Path(sys.executable).parent
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
CLIENT_NAME = "tester"

# Settings of the caller's own environment that must not reach the stack's processes.
_OUR_VARIABLES = re.compile(
    "^(" + "|".join(re.escape(name) for name in Settings.model_fields) + ")", re.IGNORECASE
)


class StackFailed(RuntimeError):
    """A process of the stack exited, or was not ready in time; the message has its log."""


class _Process:
    """A child whose merged output goes to a log file and is watched for a ready line."""

    def __init__(self, name: str, args: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._log = self.log_path.open("a", encoding="utf-8")
        self.popen = subprocess.Popen(
            list(args),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,  # a Ctrl-C meant for the test runner stops it, not them
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._log.write(line)
            self._log.flush()
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_SECONDS) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self._lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self._lines)
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise StackFailed(
                        f"{self.name} exited with {self.popen.returncode}:\n{self.output()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StackFailed(f"{self.name} not ready in {timeout:.0f} s:\n{self.output()}")
                self._changed.wait(min(left, 0.2))

    def stop(self) -> int:
        """SIGTERM, then SIGKILL to its whole group if it does not stop in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            code = self.popen.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # what it left behind (pool children)
        self._reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()
        return code


class ScriptableSite:
    """The stack's listing site. Pages 1-20 list made-up projects until you set them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=10.0, trust_env=False)

    @property
    def source_url(self) -> str:
        return f"{self.url}/projects?page={{page}}"

    def set_page(self, page: int, body: str | bytes, content_type: str | None = None) -> None:
        """Serve `body` as listing page `page` from now on."""
        headers = {SERVE_CONTENT_TYPE_HEADER: content_type} if content_type else {}
        data = body.encode() if isinstance(body, str) else body
        self._http.put(f"/_control/pages/{page}", content=data, headers=headers).raise_for_status()

    def set_projects(self, page: int, projects: Sequence[ListedProject]) -> None:
        """List `projects` on page `page`, in the markup the worker parses."""
        self.set_page(page, render_listing(projects))

    def script(self, page: int, responses: Sequence[Mapping[str, Any]]) -> None:
        """Answer the next requests for `page` with these, in order, then as before; each is
        {"status": 503, "headers": {...}, "body": "...", "delay": seconds}."""
        document = {"page": page, "responses": list(responses)}
        self._http.post("/_control/script", json=document).raise_for_status()

    def hits(self) -> dict[int, int]:
        """How often each page was fetched."""
        answer = self._http.get("/_control/hits")
        answer.raise_for_status()
        return {int(page): count for page, count in answer.json().items()}

    def reset(self) -> None:
        """Forget every set page, script and hit."""
        self._http.post("/_control/reset").raise_for_status()

    def close(self) -> None:
        self._http.close()


@dataclass
class HarvesterStack:
    """A running harvester: where it is, its token, a client, its site and its logs."""

    directory: Path
    env: dict[str, str]
    address: str
    token: str
    site: ScriptableSite
    client: Client
    _gateway: _Process
    _processes: list[_Process] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.directory / 'data' / 'projects.db'}"

    def new_client(self, **options: Any) -> Client:
        """Another client of the gateway (close it yourself), e.g. with another deadline or
        token (`token=None` for none)."""
        return Client(self.address, **{"token": self.token, **options})

    def stop_gateway(self) -> None:
        """Stop the gateway (SIGTERM: open streams end UNAVAILABLE); the worker goes on."""
        if self._gateway in self._processes:
            self._gateway.stop()
            self._processes.remove(self._gateway)

    def start_gateway(self) -> None:
        """Start the gateway again, on the port it had; returns once it is serving."""
        if self._gateway in self._processes:
            raise RuntimeError("the gateway is running; stop_gateway() first")
        self._gateway = _start_gateway(
            self.directory, {**self.env, "GATEWAY_ADDRESS": self.address}
        )
        self._processes.append(self._gateway)
        _wait_until_serving(self.client, self._gateway)

    def restart_gateway(self) -> None:
        """stop_gateway(), then start_gateway()."""
        self.stop_gateway()
        self.start_gateway()

    def logs(self) -> str:
        """Every process's output so far, to show when a test failed."""
        return "\n\n".join(f"===== {p.name} =====\n{p.output()}" for p in self._processes)


def _clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _OUR_VARIABLES.match(k)}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start_gateway(directory: Path, env: Mapping[str, str]) -> _Process:
    return _Process("gateway", [str(BIN / "python"), "-m", "gateway"], env, directory)


def _wait_until_serving(client: Client, gateway: _Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        try:
            if client.health():
                return
        except HarvesterError:
            pass
        if gateway.popen.poll() is not None:
            raise StackFailed(f"the gateway exited:\n{gateway.output()}")
        if time.monotonic() > deadline:
            raise StackFailed(f"the gateway's health check did not pass:\n{gateway.output()}")
        time.sleep(0.1)


@contextlib.contextmanager
def harvester_stack(
    directory: Path | None = None,
    *,
    settings: Mapping[str, str] | None = None,
    worker_concurrency: int = 4,
) -> Iterator[HarvesterStack]:
    """Start the whole harvester in `directory` (a temporary one if None), yield it running,
    stop it afterwards. `settings` are extra environment variables of its processes (the
    README's settings table), e.g. {"MAX_BATCH_PAGES": "50"}."""
    with contextlib.ExitStack() as cleanup:
        if directory is None:
            directory = Path(
                cleanup.enter_context(tempfile.TemporaryDirectory(prefix="harvester-"))
            )
        directory = directory.resolve()
        data_dir = directory / "data"
        processes: list[_Process] = []

        def stop_all() -> None:
            for process in reversed(processes):
                process.stop()

        cleanup.callback(embedded_redis.leave, data_dir)  # after the processes that use it
        cleanup.callback(stop_all)
        site_process = _Process(
            "site",
            [str(BIN / "python"), "-m", "sample_site", "--address", "127.0.0.1:0", "--control"],
            _clean_environment({}),
            directory,
        )
        processes.append(site_process)
        site = ScriptableSite(site_process.wait_for(r"listening on (http://\S+)").group(1))
        cleanup.callback(site.close)

        token = secrets.token_urlsafe(24)
        env = _clean_environment(
            {
                "DATA_DIR": str(data_dir),
                "CELERY_BROKER_URL": embedded_redis.ensure_running(data_dir),
                "SOURCE_URL": site.source_url,
                "API_TOKENS": f"{CLIENT_NAME}:{token}",
                "GATEWAY_ADDRESS": "127.0.0.1:0",
                # Quick retries: a test's scripted 503 should not cost it a second.
                "RETRY_BASE_DELAY_SECONDS": "0.2",
                "RETRY_MAX_DELAY_SECONDS": "1",
                "BROKER_CHECK_INTERVAL_SECONDS": "0.5",
                **(settings or {}),
            }
        )
        gateway = _start_gateway(directory, env)
        processes.append(gateway)
        worker = _Process(
            "worker",
            [
                str(BIN / "celery"),
                "-A",
                "worker.app",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                str(worker_concurrency),
                "-n",
                f"stack-{os.getpid()}@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            env,
            directory,
        )
        processes.append(worker)
        address = gateway.wait_for(r"gateway listening on (\S+)").group(1)
        worker.wait_for(r"ready\.")
        client = cleanup.enter_context(Client(address, token))
        _wait_until_serving(client, gateway)
        stack = HarvesterStack(directory, env, address, token, site, client, gateway, processes)
        yield stack

"""Real processes for the tests: the gateway, workers, the site and a Redis server.

Each is started as its user would start it (`python -m gateway`, `celery -A worker.app worker`,
`python -m sample_site`, `redis-server`), with its output kept in a log file under the test's
temporary directory and shown when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil

from core.embedded_redis import server_executable
from core.settings import Settings
from projects.v1 import project_service_pb2_grpc, queue_service_pb2_grpc

BIN = Path(sys.executable).parent
PYTHON = str(BIN / "python")
START_TIMEOUT = 30.0

# Settings a developer may have exported; a test's processes get only what the test gives them.
_OUR_VARIABLES = re.compile(
    "^(" + "|".join(re.escape(name) for name in Settings.model_fields) + ")",
    re.IGNORECASE,
)


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _OUR_VARIABLES.match(k)}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now on `host` (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_consecutive_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive ports free now (a metrics port per gateway process)."""
    for _ in range(50):
        first = free_port(host)
        if first + count > 65536:
            continue
        try:
            with contextlib.ExitStack() as held:
                for offset in range(1, count):
                    probe = held.enter_context(socket.socket())
                    probe.bind((host, first + offset))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


class Process:
    """A child process whose merged output is collected line by line."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = cwd / f"{name}.log"
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._log = self.log_path.open("a", encoding="utf-8")
        self.popen = subprocess.Popen(
            args,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._log.write(line)
            self._log.flush()
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(
        self, pattern: str, timeout: float = START_TIMEOUT, start: int = 0
    ) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(
                        f"{self.name} exited with {self.popen.returncode} before printing "
                        f"{pattern!r}:\n{self.output()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name} did not print {pattern!r}:\n{self.output()}")
                self._changed.wait(min(left, 0.2))

    def send(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        """Signal the process and every process it started (pool children included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; the exit code. Safe to call again."""
        self.send(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            code = self.popen.wait(5)
        self.kill_group()  # anything the process left behind
        self._reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if not self._log.closed:
            self._log.close()
        return code


@dataclass
class Site:
    process: Process
    url: str

    @property
    def source_url(self) -> str:
        return f"{self.url}/projects?page={{page}}"

    def set_page(self, page: int, body: str | bytes, content_type: str | None = None) -> None:
        headers = {"X-Serve-Content-Type": content_type} if content_type else {}
        data = body.encode() if isinstance(body, str) else body
        response = httpx.put(f"{self.url}/_control/pages/{page}", content=data, headers=headers)
        response.raise_for_status()

    def script(self, page: int, responses: list[dict[str, Any]]) -> None:
        response = httpx.post(
            f"{self.url}/_control/script", json={"page": page, "responses": responses}
        )
        response.raise_for_status()

    def hits(self) -> dict[int, int]:
        response = httpx.get(f"{self.url}/_control/hits")
        response.raise_for_status()
        return {int(k): v for k, v in json.loads(response.text).items()}

    def set_robots(self, status: int, body: str = "", delay: float = 0.0) -> None:
        document = {"status": status, "body": body, "delay": delay}
        httpx.put(f"{self.url}/_control/robots", json=document).raise_for_status()

    def behave(self, **behaviour: Any) -> None:
        """Set how the site serves (pages, delay, max_requests_per_second, max_concurrency,
        retry_after, validators: see sample_site/server.py)."""
        httpx.put(f"{self.url}/_control/behaviour", json=behaviour).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_control/reset").raise_for_status()

    def requests(self) -> list[SiteRequest]:
        """Every request the site has had (the control API's aside), in arrival order."""
        response = httpx.get(f"{self.url}/_control/log")
        response.raise_for_status()
        return [SiteRequest(**entry) for entry in json.loads(response.text)]


@dataclass(frozen=True)
class SiteRequest:
    """One request as the site logged it; times are the site's time.time()."""

    path: str
    arrival: float
    departure: float
    status: int
    user_agent: str
    if_none_match: str | None
    if_modified_since: str | None


def start_site(cwd: Path, name: str = "site") -> Site:
    process = Process(
        name,
        [PYTHON, "-m", "sample_site", "--address", "127.0.0.1:0", "--control"],
        clean_environment({}),
        cwd,
    )
    match = process.wait_for_line(r"listening on (http://\S+)")
    return Site(process, match.group(1))


@dataclass
class Gateway:
    process: Process
    address: str
    token: str
    channel: grpc.Channel = field(init=False)
    stub: queue_service_pb2_grpc.QueueServiceStub = field(init=False)
    projects: project_service_pb2_grpc.ProjectServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.address)
        self.stub = queue_service_pb2_grpc.QueueServiceStub(self.channel)
        self.projects = project_service_pb2_grpc.ProjectServiceStub(self.channel)

    def close(self) -> int:
        self.channel.close()
        return self.process.stop()


def start_gateway(cwd: Path, env: Mapping[str, str], name: str = "gateway") -> Process:
    return Process(name, [PYTHON, "-m", "gateway"], clean_environment(env), cwd)


def start_worker(
    cwd: Path,
    env: Mapping[str, str],
    name: str = "worker",
    concurrency: int = 4,
    ready: bool = True,
    options: Sequence[str] = (),
) -> Process:
    """`celery worker` on the test's settings; `options` are more of its command line."""
    args = [
        str(BIN / "celery"), "-A", "worker.app", "worker",
        "--loglevel", "INFO", "--concurrency", str(concurrency),
        "--hostname", f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h",
        "--without-mingle", "--without-gossip", *options,
    ]  # fmt: skip
    process = Process(name, args, clean_environment(env), cwd)
    if ready:
        process.wait_for_line(r"ready\.")
    return process


@dataclass
class RedisServer:
    """A redis-server of the test's own, on a free port; it may be stopped and started again."""

    directory: Path
    port: int
    appendonly: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                server_executable(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(15)
        self.process = None


def pause_processes(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


@dataclass
class RedisPause:
    """SIGSTOP and SIGCONT a RedisServer: a Redis that hangs without closing its sockets."""

    server: RedisServer

    def pause(self) -> None:
        assert self.server.process is not None
        self.server.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.server.process is not None:
            self.server.process.send_signal(signal.SIGCONT)


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server programs (initdb, pg_ctl), the newest if several."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts[-3])
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A PostgreSQL cluster of the test's own, on a free port, which may be started late,
    paused (every process SIGSTOPped: a database that hangs) and resumed: never the machine's.

    Run as the `postgres` user when the tests run as root (initdb refuses root), in a directory
    of its own under /tmp (a pytest tmp_path is private to root).
    """

    def __init__(
        self,
        bin_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        wrap: Sequence[str] = (),
        clients: str = "samenet",
    ) -> None:
        """`wrap` prefixes every command (`ip netns exec NAME`: a cluster in a namespace,
        listening on that namespace's `host`); off loopback, `clients` (pg_hba.conf's address
        field: a CIDR, or `samenet`, the server's own subnets) are trusted."""
        self.bin_dir = bin_dir
        self.host = host
        self.port = port or free_port(host)
        self.directory = Path(tempfile.mkdtemp(prefix="harvest-pg-"))
        self.data = self.directory / "data"
        self._as: list[str] = list(wrap)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            self._as += ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        if host != "127.0.0.1":
            # initdb trusts loopback only; clients on the cluster's other hosts come from its
            # subnet, or from `clients`.
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {clients} trust\n")

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self.bin_dir / program), *args],
            check=True,
            capture_output=True,
            cwd=self.directory,
            timeout=START_TIMEOUT,
        )

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/postgres"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses={self.host} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.directory / "log"),
            "-w", "start",
        )  # fmt: skip

    def processes(self) -> list[psutil.Process]:
        postmaster = psutil.Process(int((self.data / "postmaster.pid").read_text().split()[0]))
        return [postmaster, *postmaster.children(recursive=True)]

    def pause(self) -> None:
        pause_processes(self.processes(), signal.SIGSTOP)

    def resume(self) -> None:
        pause_processes(self.processes(), signal.SIGCONT)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.resume()
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def poll_until(
    condition: Any, timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Call `condition` until it returns something truthy; that value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)

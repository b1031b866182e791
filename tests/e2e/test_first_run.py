"""What a new user meets running the gateway and a worker on their own, from a fresh clone.

`--help` touches nothing, a bad setting is one line and exit 2, a port in use is one line, a
second worker gets a node name of its own, the embedded Redis goes with its last user, and a
worker whose broker went away stops with one line, not a traceback per logging call.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil
import pytest
import redis

from core import embedded_redis
from tests.support.processes import BIN, PYTHON, Process, clean_environment, poll_until

CELERY = str(BIN / "celery")
WORKER = [CELERY, "-A", "worker.app", "worker", "--loglevel", "INFO"]
BAD_TOKENS = "API_TOKENS: entry #1 must look like name:token"


def run(args: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        env=clean_environment(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A port someone else listens on, as a first gateway would."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_gateway_help_says_what_it_does_and_touches_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # A bad setting too: --help must not read the settings at all.
    result = run(
        [PYTHON, "-m", "gateway", "--help"], {"DATA_DIR": str(data), "API_TOKENS": "x"}, tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m gateway")
    for needed in ("GATEWAY_ADDRESS", ".env", "settings table", "python -m core.settings_doc"):
        assert needed in result.stdout
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == [], "--help created files"

    unknown = run([PYTHON, "-m", "gateway", "--port", "1"], {"DATA_DIR": str(data)}, tmp_path)
    assert unknown.returncode == 2
    assert "unrecognized arguments: --port 1" in unknown.stderr
    assert not data.exists()


def test_gateway_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run(
        [PYTHON, "-m", "gateway"],
        {"DATA_DIR": str(tmp_path / "data"), "API_TOKENS": "alice"},
        tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [BAD_TOKENS]
    assert "alice" not in result.stdout + result.stderr
    assert not (tmp_path / "data").exists()


def test_gateway_on_a_port_in_use_is_one_line(tmp_path: Path, listening: socket.socket) -> None:
    address = f"127.0.0.1:{listening.getsockname()[1]}"
    result = run(
        [PYTHON, "-m", "gateway"],
        {"DATA_DIR": str(tmp_path / "data"), "GATEWAY_ADDRESS": address, "API_TOKENS": "a:b"},
        tmp_path,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{address} is in use: is another gateway")
    # Checked first: no migration, no broker, no token.
    assert not (tmp_path / "data").exists()
    assert result.stdout == ""


def test_worker_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run(WORKER, {"DATA_DIR": str(tmp_path / "data"), "API_TOKENS": "alice"}, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [BAD_TOKENS]
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "data").exists()


def _redis_pid(data: Path) -> int:
    pid: int = poll_until(
        lambda: (data / "redis.pid").exists() and int((data / "redis.pid").read_text()),
        10,
        what="the embedded Redis's pid file",
    )
    return pid


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_gateway_on_its_own_stops_the_embedded_redis_it_started(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"DATA_DIR": str(data), "GATEWAY_ADDRESS": "127.0.0.1:0", "API_TOKENS": "a:b"}
    gateway = Process("gateway", [PYTHON, "-m", "gateway"], clean_environment(env), tmp_path)
    try:
        gateway.wait_for_line(r"gateway listening on")
        redis_pid = _redis_pid(data)
        assert not _gone(redis_pid)
        # At once: a SIGTERM in the gateway's first moments stops it too (its event listener
        # once swallowed that cancel).
        gateway.send(signal.SIGTERM)
        assert gateway.popen.wait(20) == 0, gateway.output()
    finally:
        gateway.stop()
    poll_until(lambda: _gone(redis_pid), 10, what="the embedded Redis to stop")
    assert "stopped the embedded Redis" in gateway.output()


def test_workers_get_node_names_of_their_own_and_the_last_stops_the_redis(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = clean_environment({"DATA_DIR": str(data)})
    # As the README starts one: no -n. Two of them on one host used to be celery@<host> both.
    workers = [Process(f"worker{n}", WORKER, env, tmp_path) for n in (1, 2)]
    try:
        names = [w.wait_for_line(r"(\S+@\S+) ready\.").group(1) for w in workers]
        for worker, name in zip(workers, names, strict=True):
            assert name.startswith(f"worker-{worker.pid}@"), name
        assert names[0] != names[1]
        redis_pid = _redis_pid(data)

        workers[0].send(signal.SIGTERM)
        assert workers[0].popen.wait(30) == 0, workers[0].output()
        assert not _gone(redis_pid), "the embedded Redis stopped under a worker still using it"
        workers[1].send(signal.SIGTERM)
        assert workers[1].popen.wait(30) == 0, workers[1].output()
        poll_until(lambda: _gone(redis_pid), 10, what="the last user to stop the embedded Redis")
    finally:
        for worker in workers:
            worker.stop()
    for worker in workers:
        assert "DuplicateNodenameWarning" not in worker.output()


def test_worker_whose_broker_went_away_stops_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = embedded_redis.ensure_running(data, user=False)
    worker = Process("worker", WORKER, clean_environment({"CELERY_BROKER_URL": url}), tmp_path)
    try:
        worker.wait_for_line(r"ready\.")
        lost_at = len(worker.lines)
        # The server goes, its pub/sub connection first (as when it closes that one first; the
        # order is otherwise the kernel's): Celery then closed Gossip's consumers on a
        # connection it had already dropped, and the AttributeError escaped at Ctrl-C.
        client = redis.Redis(unix_socket_path=str(embedded_redis.socket_path(data)))
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
        pipe.execute_command("SHUTDOWN", "NOSAVE")  # type: ignore[no-untyped-call]
        with pytest.raises(redis.ConnectionError):
            pipe.execute()
        client.close()
        worker.wait_for_line(r"Cannot connect to redis\+socket", timeout=20, start=lost_at)
        worker.send(signal.SIGINT)
        code = worker.popen.wait(30)
    finally:
        worker.stop()
    after = worker.lines[lost_at:]
    output = "\n".join(after)
    assert code in (0, 1), output  # 1: Celery's code for a warm shutdown by Ctrl-C
    assert "Traceback" not in output
    said = [line for line in after if "stopping without the broker" in line]
    assert len(said) == 1, output
    assert re.search(r"redis\+socket://\S+ is unreachable\): this worker held no task", said[0])
    assert len(after) < 40, output

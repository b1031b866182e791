"""`make run`'s launcher as a newcomer uses it: embedded broker, sample site, one token."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from contextlib import ExitStack
from pathlib import Path

import httpx
import psutil

from tests.support.processes import BIN, PYTHON, Process, clean_environment, free_port, poll_until


def grpcurl(*args: str) -> dict[str, object]:
    result = subprocess.run(
        [str(BIN / "grpcurl"), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_devstack_runs_a_harvest_and_stops_everything(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = clean_environment(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "GATEWAY_ADDRESS": address,
            "SAMPLE_SITE_ADDRESS": f"127.0.0.1:{free_port()}",
        }
    )
    launcher = Process("devstack", [PYTHON, "-m", "devstack"], env, tmp_path)
    try:
        token = launcher.wait_for_line(r"token\s+(\S+)", timeout=60).group(1)
        children = psutil.Process(launcher.pid).children(recursive=True)
        auth = ["-plaintext", "-H", f"authorization: Bearer {token}"]
        task = grpcurl(*auth, "-d", '{"page": 1}', address, "projects.v1.QueueService/Upload")[
            "task"
        ]
        assert isinstance(task, dict)

        def finished() -> dict[str, object] | None:
            got = grpcurl(
                *auth,
                "-d",
                json.dumps({"id": task["id"]}),
                address,
                "projects.v1.QueueService/GetStatus",
            )
            status = got["task"]
            assert isinstance(status, dict)
            return status if status["status"] == "TASK_STATUS_SUCCESS" else None

        done = poll_until(finished, 60, 0.2, "the harvest to succeed")
        assert done["result"] == {"page": 1, "found": 10, "created": 10}
        # The banner's harvester lines work as printed, in another terminal.
        exported = launcher.wait_for_line(r"^  export (HARVESTER_ADDRESS=\S+ HARVESTER_TOKEN=\S+)$")
        command = launcher.wait_for_line(r"^  (\S+harvester upload 1-5 --wait)$").group(1)
        harvester = subprocess.run(
            [str(tmp_path / command.split()[0]), *command.split()[1:]],
            env={**env, **dict(pair.split("=", 1) for pair in exported.group(1).split())},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert harvester.returncode == 0, harvester.stderr
        assert json.loads(harvester.stdout.splitlines()[-1])["batch"]["pages_succeeded"] == 5
        # make run serves metrics on both sides and says where.
        endpoints = launcher.wait_for_line(r"^  metrics +gateway (http://\S+), worker (http://\S+)")
        gateway_metrics = httpx.get(endpoints.group(1), timeout=5).text
        assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Upload"' in gateway_metrics
        worker_metrics = httpx.get(endpoints.group(2), timeout=5).text
        # Page 1's Upload and the 5 pages of the harvester's batch above.
        assert 'harvester_worker_tasks_total{outcome="success"} 6.0' in worker_metrics
        redis_pid = int((tmp_path / "data" / "redis.pid").read_text())
    finally:
        launcher.send(signal.SIGINT)
        code = launcher.popen.wait(60)
        launcher.stop()
    assert code == 0, launcher.output()
    assert "all stopped" in launcher.output()
    left = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {left}"
    assert not psutil.pid_exists(redis_pid), "the embedded Redis was left running"
    assert re.search(r"\[worker\].*succeeded", launcher.output())
    assert os.path.exists(tmp_path / "data" / "projects.db")

    # The banner (and its token) comes once the gateway is bound and the worker is consuming.
    lines = launcher.lines

    def first(pattern: str) -> int:
        return next(i for i, line in enumerate(lines) if re.search(pattern, line))

    shown = first(r"^The harvester is running")
    assert first(r"^\[gateway\] .*gateway listening on") < shown
    assert first(r"^\[worker\] .*devstack-worker@\S+ ready\.") < shown


def _devstack(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "devstack", *args],
        env=clean_environment({"DATA_DIR": str(tmp_path / "data"), **env}),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_second_make_run_says_its_ports_are_in_use_and_starts_nothing(tmp_path: Path) -> None:
    with ExitStack() as held:  # the first make run's gateway and sample site
        ports = []
        for _ in range(2):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            ports.append(sock.getsockname()[1])
        gateway, site = (f"127.0.0.1:{port}" for port in ports)
        result = _devstack(tmp_path, GATEWAY_ADDRESS=gateway, SAMPLE_SITE_ADDRESS=site)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"{gateway} and {site} are in use: is another make run up?"
    ]
    assert result.stdout == ""  # no banner, no token
    assert not (tmp_path / "data").exists(), "it started the embedded Redis"


def test_make_run_help_says_what_it_does_and_touches_nothing(tmp_path: Path) -> None:
    result = _devstack(tmp_path, "--help", API_TOKENS="not-a-pair")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m devstack")
    for needed in (".env", "settings table", "python -m core.settings_doc", "Ctrl-C"):
        assert needed in result.stdout
    assert list(tmp_path.iterdir()) == [], "--help created files"
    unknown = _devstack(tmp_path, "--gateway", "1")
    assert unknown.returncode == 2
    assert "unrecognized arguments: --gateway 1" in unknown.stderr


def test_make_run_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _devstack(tmp_path, API_TOKENS="alice", MAX_PAGE="lots")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "API_TOKENS: entry #1 must look like name:token",
        "MAX_PAGE: should be a valid integer, unable to parse string as an integer",
    ]
    assert "alice" not in result.stdout + result.stderr
    assert not (tmp_path / "data").exists()

"""`make run`'s launcher as a newcomer uses it: embedded broker, sample site, one token."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

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

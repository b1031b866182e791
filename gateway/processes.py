"""GATEWAY_PROCESSES: several gateway processes serving one port, started and stopped together.

A Python gRPC server is bound to one core by the GIL, so one process cannot use a host's other
cores. Each child is a whole `python -m gateway`, started fresh (not forked: grpc and the
broker clients do not survive a fork), listening with SO_REUSEPORT so the kernel spreads
connections over them. They share nothing but the database and the broker, as gateways on
separate hosts do.

The parent only supervises: SIGTERM or SIGINT is passed on to every child, and when one child
dies on its own the others are stopped too and the parent exits non-zero, so whatever runs the
gateway (systemd, compose, Kubernetes) restarts it whole instead of it serving at part strength.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from types import FrameType

from core.settings import Settings, generate_token
from gateway.server import banner

log = logging.getLogger(__name__)


def child_environment(settings: Settings, token: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["GATEWAY_PROCESSES"] = "1"
    env["GATEWAY_REUSE_PORT"] = "true"
    if token is not None:
        # One token for all of them, or a client would be refused by every other process.
        env["API_TOKENS"] = f"default:{token}"
    return env


def run_processes(settings: Settings) -> int:
    """Run GATEWAY_PROCESSES gateways on GATEWAY_ADDRESS until signalled; the exit status."""
    token = None if settings.api_tokens else generate_token()
    env = child_environment(settings, token)
    command = [sys.executable, "-m", "gateway"]
    children = {
        child.pid: child
        for child in (subprocess.Popen(command, env=env) for _ in range(settings.gateway_processes))
    }
    log.info(
        "started %d gateway processes on %s: %s",
        len(children),
        settings.gateway_address,
        ", ".join(map(str, children)),
    )
    if token is not None:
        tls = settings.gateway_tls_cert_file is not None
        print(banner(settings.gateway_address, token, tls), flush=True)

    stopping = False

    def stop_all(signum: int, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    status = 0
    while children:
        pid, wait_status = os.wait()
        child = children.pop(pid, None)
        if child is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        child.returncode = code
        if not stopping:
            log.error("gateway process %d exited (%d); stopping the others", pid, code)
            status = 1
            stop_all(signal.SIGTERM)
        elif code not in (0, -signal.SIGTERM):
            status = status or 1
    return status

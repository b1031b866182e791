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

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from types import FrameType

from core.metrics import with_port_offset
from core.settings import Settings, generate_token
from gateway.server import banner

log = logging.getLogger(__name__)

IN_USE = "in use"


def listen_problem(address: str, reuse_port: bool = False) -> str | None:
    """Why nothing could listen on host:port now (`IN_USE`, or the system's reason); else None.

    Probes the way the servers bind (SO_REUSEADDR, and SO_REUSEPORT when they share the port),
    so a port left in TIME_WAIT by a server just stopped is free, one listened on is not.
    """
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None  # the server picks a port, or rejects the address itself
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        return error.strerror
    reasons = []
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return IN_USE
                reasons.append(error.strerror or str(error))
    # A name may resolve to addresses this host lacks (::1 without IPv6): one that works is enough.
    return reasons[0] if reasons and len(reasons) == len(found) else None


def cannot_listen_message(address: str, reason: str, hint: str) -> str:
    """The one line a process that cannot listen on `address` ends with."""
    if reason == IN_USE:
        return f"{address} is in use: {hint}"
    return f"cannot listen on {address}: {reason}"


def child_environment(
    token: str | None, metrics_address: str | None = None, index: int = 0
) -> dict[str, str]:
    env = dict(os.environ)
    env["GATEWAY_PROCESSES"] = "1"
    env["GATEWAY_REUSE_PORT"] = "true"
    if token is not None:
        # One token for all of them, or a client would be refused by every other process.
        env["API_TOKENS"] = f"default:{token}"
    if metrics_address is not None:
        # One metrics port per process (core.metrics): child i serves on port + i.
        env["GATEWAY_METRICS_ADDRESS"] = with_port_offset(metrics_address, index)
    return env


def run_processes(settings: Settings) -> int:
    """Run GATEWAY_PROCESSES gateways on GATEWAY_ADDRESS until signalled; the exit status."""
    token = None if settings.api_tokens else generate_token()
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop_all(signum: int, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        # os.kill, not Popen.send_signal: that polls, and could reap a child os.wait() below
        # is counting on. A child still in `children` is unreaped, so its pid is still its own.
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # Before the first child starts, so a signal never leaves one running without its parent.
    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for index in range(settings.gateway_processes):
        if stopping:
            break
        env = child_environment(token, settings.gateway_metrics_address, index)
        child = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
        children[child.pid] = child
    log.info(
        "started %d gateway processes on %s: %s",
        len(children),
        settings.gateway_address,
        ", ".join(map(str, children)),
    )
    if token is not None:
        tls = settings.gateway_tls_cert_file is not None
        print(banner(settings.gateway_address, token, tls), flush=True)

    status = 0
    while children:
        pid, wait_status = os.wait()
        if pid not in children:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        children.pop(pid).returncode = code
        if not stopping:
            log.error("gateway process %d exited (%d); stopping the others", pid, code)
            status = 1
            stop_all(signal.SIGTERM)
        elif code not in (0, -signal.SIGTERM):
            status = status or 1
    return status

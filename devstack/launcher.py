"""Start the embedded broker, the sample site, the gateway and one worker; stop them together.

Each child is a real process started as its user would start it, in a session of its own (so
Ctrl-C reaches only this launcher, which then stops them in order) and tied to the launcher's
life by PR_SET_PDEATHSIG, so none is left behind even if the launcher is killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core import embedded_redis
from core.settings import Settings, generate_token

log = logging.getLogger("devstack")

BIN = Path(sys.executable).parent
STOP_TIMEOUT_SECONDS = 20.0
START_TIMEOUT_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[str]

    def pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT_SECONDS)
            self.popen.kill()
            return self.popen.wait()


def start_child(name: str, args: list[str], env: Mapping[str, str]) -> Child:
    popen = subprocess.Popen(
        args,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, before exec
    )
    child = Child(name, popen)
    threading.Thread(target=child.pump, name=f"pump-{name}", daemon=True).start()
    return child


def banner(settings: Settings, token: str | None, site_started: bool) -> str:
    grpcurl = os.path.relpath(BIN / "grpcurl")
    address = settings.gateway_address
    transport = "-cacert <CA file>" if settings.gateway_tls_cert_file else "-plaintext"
    auth = f"-H 'authorization: Bearer {token}'" if token else "-H 'authorization: Bearer <token>'"
    lines = [
        "",
        "The harvester is running. Ctrl-C stops everything.",
        f"  gateway      {address}  (gRPC, reflection on: no .proto needed)",
        f"  source       {settings.source_url}"
        + ("  (the bundled sample site)" if site_started else ""),
        f"  database     {settings.resolved_database_url}",
    ]
    if token:
        lines.append(
            f"  token        {token}  (client 'default'; set API_TOKENS to choose your own)"
        )
    lines += [
        "Try:",
        f"  {grpcurl} {transport} {address} list",
        f"  {grpcurl} {transport} {auth} -d '{{\"page\": 1}}' {address} "
        "projects.v1.QueueService/Upload",
        f'  {grpcurl} {transport} {auth} -d \'{{"id": "<task id>"}}\' {address} '
        "projects.v1.QueueService/GetStatus",
        "",
    ]
    return "\n".join(lines)


def wait_until_serving(address: str, children: list[Child], stopping: threading.Event) -> bool:
    """Wait for the gateway's health check to pass; False if a child died or we were stopped."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not stopping.is_set() and time.monotonic() < deadline:
            if any(child.popen.poll() is not None for child in children):
                return False
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            stopping.wait(0.2)
    return False


def run(settings: Settings, environ: Mapping[str, str]) -> int:
    env = dict(environ)
    env["PYTHONUNBUFFERED"] = "1"
    started_redis = False
    if settings.celery_broker_url is None:
        started_redis = not embedded_redis.is_running(settings.data_dir)
        env["CELERY_BROKER_URL"] = embedded_redis.ensure_running(settings.data_dir)
        log.info("embedded Redis broker at %s", env["CELERY_BROKER_URL"])
    token = None
    if not settings.api_tokens:
        token = generate_token()
        env["API_TOKENS"] = f"default:{token}"

    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("got %s; stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    children: list[Child] = []
    code = 0
    try:
        site_started = settings.source_is_sample_site
        if site_started:
            children.append(start_child("site", [str(BIN / "python"), "-m", "sample_site"], env))
        children.append(start_child("gateway", [str(BIN / "python"), "-m", "gateway"], env))
        children.append(
            start_child(
                "worker",
                [str(BIN / "celery"), "-A", "worker.app", "worker", "--loglevel", "INFO"],
                env,
            )
        )
        if wait_until_serving(settings.gateway_address, children, stopping):
            print(banner(settings, token, site_started), flush=True)
        while not stopping.wait(0.5):
            exited = [c for c in children if c.popen.poll() is not None]
            if exited:
                for child in exited:
                    log.error(
                        "%s exited with %s; stopping the rest", child.name, child.popen.returncode
                    )
                code = 1
                break
    finally:
        for child in reversed(children):
            child.stop()
        if started_redis:
            embedded_redis.stop(settings.data_dir)
        log.info("all stopped")
    return code

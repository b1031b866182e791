"""Start the embedded broker, the sample site, the gateway and one worker; stop them together.

Each child is a real process started as its user would start it, in a session of its own (so
Ctrl-C reaches only this launcher, which then stops them in order) and tied to the launcher's
life by PR_SET_PDEATHSIG, so none is left behind even if the launcher is killed.

The ports are checked before anything starts (a second `make run` says its port is in use and
stops), and the banner is printed only once each child said it is ready (the site and the
gateway bound, the worker consuming) and the gateway's health check passes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core import embedded_redis
from core.settings import Settings, generate_token
from gateway.processes import IN_USE, cannot_listen_message, listen_problem

log = logging.getLogger("devstack")

BIN = Path(sys.executable).parent
STOP_TIMEOUT_SECONDS = 20.0
START_TIMEOUT_SECONDS = 60.0
WORKER_NODE_NAME = "devstack-worker@%h"
# What gateway and worker log once they serve metrics (core.metrics); make run turns them on.
METRICS_LINE = re.compile(r" metrics on (http://\S+)")
METRICS_WAIT_SECONDS = 5.0
IN_USE_HINT = "is another make run up?"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[str]
    ready_line: re.Pattern[str]  # what the child prints once it is ready
    ready: threading.Event = field(default_factory=threading.Event)
    ready_match: re.Match[str] | None = None
    metrics_url: str | None = None  # where it serves Prometheus metrics, once it said so

    def pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()
            if not self.ready.is_set() and (match := self.ready_line.search(line)):
                self.ready_match = match
                self.ready.set()
            if self.metrics_url is None and (match := METRICS_LINE.search(line)):
                self.metrics_url = match.group(1)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT_SECONDS)
            self.popen.kill()
            return self.popen.wait()


def start_child(name: str, args: list[str], env: Mapping[str, str], ready_line: str) -> Child:
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
    child = Child(name, popen, re.compile(ready_line))
    threading.Thread(target=child.pump, name=f"pump-{name}", daemon=True).start()
    return child


def banner(settings: Settings, address: str, token: str | None, site_started: bool) -> str:
    grpcurl = os.path.relpath(BIN / "grpcurl")
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
    harvester = os.path.relpath(BIN / "harvester")
    environment = f"HARVESTER_ADDRESS={address} HARVESTER_TOKEN={token or '<token>'}"
    if settings.gateway_tls_cert_file:
        environment += " HARVESTER_TLS_CA_FILE=<CA file>"
    lines += [
        "Try (in another terminal):",
        f"  export {environment}",
        f"  {harvester} upload 1-5 --wait",
        f"  {harvester} projects --limit 5",
        "or with grpcurl:",
        f"  {grpcurl} {transport} {address} list",
        f"  {grpcurl} {transport} {auth} -d '{{\"page\": 1}}' {address} "
        "projects.v1.QueueService/Upload",
        f'  {grpcurl} {transport} {auth} -d \'{{"id": "<task id>"}}\' {address} '
        "projects.v1.QueueService/GetStatus",
        "",
    ]
    return "\n".join(lines)


def metrics_lines(children: list[Child], stopping: threading.Event) -> str:
    """Where the gateway and the worker serve their metrics (each logs it as it starts)."""
    serving = [child for child in children if child.name in ("gateway", "worker")]
    deadline = time.monotonic() + METRICS_WAIT_SECONDS
    while any(c.metrics_url is None for c in serving) and time.monotonic() < deadline:
        if stopping.wait(0.05):
            break
    found = ", ".join(f"{c.name} {c.metrics_url or '(not yet serving)'}" for c in serving)
    return f"  metrics      {found}  (Prometheus text format)\n"


def ports_in_use(settings: Settings) -> list[str]:
    """What keeps this run from listening where it needs to, a line per cause; [] if nothing."""
    wanted = [(settings.gateway_address, settings.gateway_reuse_port)]
    if settings.source_is_sample_site:
        wanted.append((settings.sample_site_address, False))
    problems = [(address, listen_problem(address, reuse_port)) for address, reuse_port in wanted]
    in_use = [address for address, reason in problems if reason == IN_USE]
    lines = [
        cannot_listen_message(address, reason, IN_USE_HINT)
        for address, reason in problems
        if reason is not None and reason != IN_USE
    ]
    if len(in_use) == 1:
        lines.insert(0, cannot_listen_message(in_use[0], IN_USE, IN_USE_HINT))
    elif in_use:  # the usual case of a second make run: one line for both
        lines.insert(0, f"{' and '.join(in_use)} are in use: {IN_USE_HINT}")
    return lines


class NotReady(Exception):
    """A child exited, or did not get ready in time, before the banner."""


def wait_until_ready(children: list[Child], stopping: threading.Event, deadline: float) -> bool:
    """Wait until every child printed its ready line; False when we were stopped meanwhile."""
    while not stopping.is_set():
        for child in children:
            if child.popen.poll() is not None and not child.ready.is_set():
                raise NotReady(
                    f"{child.name} exited with {child.popen.returncode} before it was ready"
                )
        if all(child.ready.is_set() for child in children):
            return True
        if time.monotonic() > deadline:
            late = ", ".join(c.name for c in children if not c.ready.is_set())
            raise NotReady(f"not ready after {START_TIMEOUT_SECONDS:.0f} s: {late}")
        stopping.wait(0.1)
    return False


def wait_until_serving(
    address: str, children: list[Child], stopping: threading.Event, deadline: float
) -> bool:
    """Wait for our gateway's health check to pass; False when we were stopped meanwhile."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not stopping.is_set():
            if exited := [c for c in children if c.popen.poll() is not None]:
                raise NotReady(f"{exited[0].name} exited with {exited[0].popen.returncode}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise NotReady(
                    f"the gateway's health check did not pass in {START_TIMEOUT_SECONDS:.0f} s"
                )
            stopping.wait(0.2)
    return False


def wait_for_start(
    settings: Settings, gateway: Child, children: list[Child], stopping: threading.Event
) -> str | None:
    """The gateway's bound address once every child is ready; None when stopped meanwhile."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    if not wait_until_ready(children, stopping, deadline):
        return None
    assert gateway.ready_match is not None
    address = gateway.ready_match.group(1)  # as bound: a port 0 became a real one
    # Health is the broker and the database; a TLS gateway's is left to the user's client.
    if settings.gateway_tls_cert_file is None and not wait_until_serving(
        address, children, stopping, deadline
    ):
        return None
    return address


def run(settings: Settings, environ: Mapping[str, str]) -> int:
    # Before anything starts: a second make run would otherwise meet the first one's gateway.
    if busy := ports_in_use(settings):
        for line in busy:
            print(line, file=sys.stderr, flush=True)
        return 1
    env = dict(environ)
    env["PYTHONUNBUFFERED"] = "1"
    if settings.celery_broker_url is None:
        # This launcher is the embedded Redis's user for its children (they are given the URL).
        env["CELERY_BROKER_URL"] = embedded_redis.ensure_running(settings.data_dir)
        log.info("embedded Redis broker at %s", env["CELERY_BROKER_URL"])
    # Metrics on, on ports the system picks (printed below), unless set to ports of your own.
    if settings.gateway_metrics_address is None:
        env["GATEWAY_METRICS_ADDRESS"] = "127.0.0.1:0"
    if settings.worker_metrics_address is None:
        env["WORKER_METRICS_ADDRESS"] = "127.0.0.1:0"
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
        python = str(BIN / "python")
        if site_started:
            children.append(
                start_child("site", [python, "-m", "sample_site"], env, r"sample site listening on")
            )
        gateway = start_child(
            "gateway", [python, "-m", "gateway"], env, r"gateway listening on (\S+)"
        )
        children.append(gateway)
        worker_args = [str(BIN / "celery"), "-A", "worker.app", "worker", "--loglevel", "INFO"]
        children.append(
            start_child("worker", [*worker_args, "-n", WORKER_NODE_NAME], env, r"\S@\S+ ready\.")
        )
        try:
            address = wait_for_start(settings, gateway, children, stopping)
        except NotReady as error:
            log.error("%s; stopping the rest", error)
            return 1
        if address is None:
            return 0  # stopped while starting
        print(banner(settings, address, token, site_started), flush=True)
        print(metrics_lines(children, stopping), flush=True)
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
        # Stopped unless another process (a gateway or worker started on its own) still uses it.
        embedded_redis.leave(settings.data_dir)
        log.info("all stopped")
    return code

"""Serving a process's Prometheus metrics: one `/metrics` endpoint per process.

Several processes of one kind (GATEWAY_PROCESSES, several workers on a host) each serve their
own endpoint on a port of their own, and Prometheus adds them up (`sum by (...)`). That is
prometheus-client's plain mode: no multiprocess directory to share, clean and keep free of the
files of dead processes, and a process's counters start at zero with it, which `rate()` and
`increase()` expect of a restarted target. What each side counts lives beside it
(`gateway/metrics.py`, `worker/metrics.py`); the names follow Prometheus's conventions (base
units, `_total`, `_seconds`, `_bytes`) and the labels are few and bounded (never a page, a URL,
a token or a task id).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def split_address(address: str) -> tuple[str, int]:
    """host:port (the settings have checked its shape) as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def with_port_offset(address: str, offset: int) -> str:
    """The address `offset` ports above `address`: process i of a group serves on port + i."""
    host, port = split_address(address)
    return f"{host}:{port + offset}"


@dataclass
class MetricsEndpoint:
    """A running `/metrics` HTTP server (a daemon thread of prometheus-client's)."""

    server: WSGIServer
    host: str

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(
    address: str, what: str, registry: CollectorRegistry = REGISTRY
) -> MetricsEndpoint:
    """Serve `registry` on host:port (port 0: one the system picks), and log where."""
    host, port = split_address(address)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    endpoint = MetricsEndpoint(server, host)
    # The tests and `make run` read the port back from this line.
    log.info("%s metrics on %s", what, endpoint.url)
    return endpoint

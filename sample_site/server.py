"""A small HTTP listing site to harvest from, with an optional control API to script faults.

`GET /projects?page=N` serves the sample listing. With `control=True`, tests can replace pages,
queue scripted responses (errors, delays) and read per-page hit counts:

    PUT  /_control/pages/{n}   body = the exact bytes to serve for page n from now on
                               (header X-Serve-Content-Type: the Content-Type to serve them with)
    POST /_control/script      {"page": n, "responses": [{"status", "headers", "body", "delay"}]}
                               queued, one per request for page n, before the page itself
    GET  /_control/hits        {"<n>": requests for page n, ...}
    POST /_control/reset       forget pages, scripts and hits

Only the standard library's http.server: the site must start anywhere the tests run.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import socketserver
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sample_site.pages import SAMPLE_PAGES, render_listing, sample_page

logger = logging.getLogger(__name__)

HTML_CONTENT_TYPE = "text/html; charset=utf-8"
SERVE_CONTENT_TYPE_HEADER = "X-Serve-Content-Type"
# A control body bigger than this is a mistake in a test, not a page worth holding in memory.
MAX_CONTROL_BODY_BYTES = 16 * 1024 * 1024
# Idle keep-alive connections give their thread back after this long.
CONNECTION_IDLE_TIMEOUT_SECONDS = 60.0

_INT = re.compile(r"-?[0-9]+")
_CONTROL_PAGE_PATH = re.compile(r"/_control/pages/(-?[0-9]+)")


@dataclass(frozen=True, slots=True)
class _Page:
    body: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class _ScriptedResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    delay: float


@dataclass
class _SiteState:
    """Everything the control API changes; handler threads share it under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pages: dict[int, _Page] = field(default_factory=dict)
    scripts: dict[int, deque[_ScriptedResponse]] = field(default_factory=dict)
    hits: Counter[int] = field(default_factory=Counter)


class _BadRequest(Exception):
    """A control request the site cannot act on; the message goes back to the client."""


class SampleSiteServer(ThreadingHTTPServer):
    """The sample site: a threading HTTP server that owns the scripted state."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, control: bool) -> None:
        # An IPv6 literal needs an IPv6 socket; the class default is IPv4.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.control = control
        self.state = _SiteState()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a reverse DNS lookup that can take
        # seconds); the name is only used in CGI environments, so keep the literal host.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a test's timeout, for one) is normal here, not a
        # traceback on stderr.
        logger.debug("request from %s failed", client_address, exc_info=True)


def make_server(address: tuple[str, int], *, control: bool) -> ThreadingHTTPServer:
    """Bind the sample site to `address` (port 0 picks a free port); call serve_forever()."""
    return SampleSiteServer(address, control=control)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, as real sites do; every answer carries Content-Length.
    protocol_version = "HTTP/1.1"
    timeout = CONNECTION_IDLE_TIMEOUT_SECONDS
    server: SampleSiteServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path, query = self._target()
        if path == "/projects":
            self._serve_projects(query)
        elif path == "/_control/hits" and self.server.control:
            self._serve_hits()
        else:
            self._not_found()

    def do_PUT(self) -> None:
        path, _ = self._target()
        match = _CONTROL_PAGE_PATH.fullmatch(path)
        if match is None or not self.server.control:
            self._not_found()
            return
        body = self._read_body()
        if body is None:
            return
        page = _Page(body, self.headers.get(SERVE_CONTENT_TYPE_HEADER, HTML_CONTENT_TYPE))
        state = self.server.state
        with state.lock:
            state.pages[int(match.group(1))] = page
        self._send(HTTPStatus.NO_CONTENT)

    def do_POST(self) -> None:
        path, _ = self._target()
        if not self.server.control or path not in ("/_control/script", "/_control/reset"):
            self._not_found()
            return
        body = self._read_body()
        if body is None:
            return
        state = self.server.state
        if path == "/_control/reset":
            with state.lock:
                state.pages.clear()
                state.scripts.clear()
                state.hits.clear()
            self._send(HTTPStatus.NO_CONTENT)
            return
        try:
            page, responses = _parse_script(body)
        except _BadRequest as exc:
            self._send(HTTPStatus.BAD_REQUEST, str(exc).encode(), "text/plain; charset=utf-8")
            return
        with state.lock:
            # Appended, so a test can queue more responses while earlier ones are pending.
            state.scripts.setdefault(page, deque()).extend(responses)
        self._send(HTTPStatus.NO_CONTENT)

    def _target(self) -> tuple[str, str]:
        parts = urlsplit(self.path)
        return parts.path, parts.query

    def _serve_projects(self, query: str) -> None:
        values = parse_qs(query, keep_blank_values=True).get("page", [])
        if len(values) != 1 or _INT.fullmatch(values[0]) is None:
            self._send(
                HTTPStatus.BAD_REQUEST,
                b"page must be one integer, e.g. /projects?page=1",
                "text/plain; charset=utf-8",
            )
            return
        page = int(values[0])
        state = self.server.state
        with state.lock:
            if self.server.control:  # only tests read hits; a public site must not grow them
                state.hits[page] += 1
            queue = state.scripts.get(page)
            scripted = queue.popleft() if queue else None
            stored = state.pages.get(page)
        if scripted is not None:
            self._send_scripted(scripted)
        elif stored is not None:
            self._send(HTTPStatus.OK, stored.body, stored.content_type)
        elif 1 <= page <= SAMPLE_PAGES:
            self._send(HTTPStatus.OK, render_listing(sample_page(page)).encode(), HTML_CONTENT_TYPE)
        else:
            self._not_found()

    def _serve_hits(self) -> None:
        with self.server.state.lock:
            hits = {str(page): count for page, count in sorted(self.server.state.hits.items())}
        self._send(HTTPStatus.OK, json.dumps(hits).encode(), "application/json")

    def _send_scripted(self, scripted: _ScriptedResponse) -> None:
        if scripted.delay > 0:
            # Outside the lock: a slow answer must not hold up other requests.
            time.sleep(scripted.delay)
        self.send_response(scripted.status)
        names = {name.lower() for name in scripted.headers}
        for name, value in scripted.headers.items():
            self.send_header(name, value)
        if "content-type" not in names:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        if "content-length" in names:
            # The script chose its own length (a truncated body, say): the connection cannot be
            # trusted for another request after that.
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(scripted.body)))
        self.end_headers()
        self.wfile.write(scripted.body)

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 400/413 for a body we will not read."""
        raw_length = self.headers.get("Content-Length", "0")
        if not raw_length.isdigit():
            self.close_connection = True
            self._send(HTTPStatus.BAD_REQUEST, b"bad Content-Length", "text/plain; charset=utf-8")
            return None
        length = int(raw_length)
        if length > MAX_CONTROL_BODY_BYTES:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return None
        return self.rfile.read(length)

    def _not_found(self) -> None:
        raw_length = self.headers.get("Content-Length", "")
        if raw_length.isdigit() and int(raw_length) <= MAX_CONTROL_BODY_BYTES:
            # Read, so that closing with it unread cannot reset the connection before the
            # client has read this answer.
            self.rfile.read(int(raw_length))
        elif raw_length or "Transfer-Encoding" in self.headers:
            # A body we will not read would be taken for the next request on this connection.
            self.close_connection = True
        self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain; charset=utf-8")

    def _send(self, status: HTTPStatus, body: bytes = b"", content_type: str = "") -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _parse_script(body: bytes) -> tuple[int, list[_ScriptedResponse]]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadRequest(f"body must be JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise _BadRequest("body must be a JSON object")
    page = document.get("page")
    raw_responses = document.get("responses")
    if not isinstance(page, int) or isinstance(page, bool):
        raise _BadRequest("page must be an integer")
    if not isinstance(raw_responses, list):
        raise _BadRequest("responses must be a list")
    return page, [_parse_response(raw) for raw in raw_responses]


def _parse_response(raw: object) -> _ScriptedResponse:
    if not isinstance(raw, dict):
        raise _BadRequest("each response must be an object")
    status = raw.get("status")
    headers = raw.get("headers", {})
    body = raw.get("body", "")
    delay = raw.get("delay", 0.0)
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise _BadRequest("status must be an integer within 200..599")
    if not isinstance(headers, dict) or not all(
        isinstance(name, str) and isinstance(value, str) for name, value in headers.items()
    ):
        raise _BadRequest("headers must map names to string values")
    if not isinstance(body, str):
        raise _BadRequest("body must be a string")
    if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
        raise _BadRequest("delay must be a non-negative number of seconds")
    return _ScriptedResponse(status, dict(headers), body.encode(), float(delay))

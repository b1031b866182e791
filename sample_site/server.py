"""A small HTTP listing site to harvest from, with an optional control API to script faults.

`GET /projects?page=N` serves the sample listing. With `control=True`, tests can replace pages,
queue scripted responses (errors, delays) and read per-page hit counts:

    PUT  /_control/pages/{n}   body = the exact bytes to serve for page n from now on
                               (header X-Serve-Content-Type: the Content-Type to serve them with)
    POST /_control/script      {"page": n, "responses": [{"status", "headers", "body", "delay"}]}
                               queued, one per request for page n, before the page itself
    GET  /_control/hits        {"<n>": requests for page n, ...}
    PUT  /_control/robots      {"status": 200, "body": "User-agent: *\\nDisallow: /x"}: what
                               GET /robots.txt answers from now on (default: 404, no rules)
    PUT  /_control/behaviour   {"pages": 200, "delay": 0.25, "max_requests_per_second": 10,
                               "max_concurrency": 4, "retry_after": 1, "validators": true}:
                               serve pages 1..pages, answer each listing after `delay` s,
                               answer 429 (with Retry-After) to a request that makes more
                               than max_requests_per_second arrive within one second, or more
                               than max_concurrency be in flight; with validators, send an
                               ETag and a Last-Modified and answer 304 to a request that
                               still matches them (omitted keys keep their values)
    GET  /_control/log         every request but the control API's, in arrival order:
                               [{"path", "arrival", "departure" (time.time() of its last
                               byte's send), "status", "user_agent", "if_none_match",
                               "if_modified_since"}, ...]
    POST /_control/reset       forget pages, scripts, hits, robots, behaviour and the log

Only the standard library's http.server: the site must start anywhere the tests run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import socket
import socketserver
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
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
# Every validated page says it last changed at this one moment (the site's start).
_LAST_MODIFIED = formatdate(time.time(), usegmt=True)


@dataclass(frozen=True, slots=True)
class _Page:
    body: bytes
    content_type: str
    modified: str  # its Last-Modified (an HTTP date)


@dataclass(frozen=True, slots=True)
class _ScriptedResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    delay: float


@dataclass
class _Behaviour:
    """How the site serves its listing: how many pages, how slowly, how strictly."""

    pages: int = SAMPLE_PAGES
    delay: float = 0.0
    max_requests_per_second: int | None = None
    max_concurrency: int | None = None
    retry_after: int = 1
    validators: bool = False


@dataclass
class _LoggedRequest:
    path: str
    arrival: float
    user_agent: str
    if_none_match: str | None
    if_modified_since: str | None
    status: int = 0
    departure: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "arrival": self.arrival,
            "departure": self.departure,
            "status": self.status,
            "user_agent": self.user_agent,
            "if_none_match": self.if_none_match,
            "if_modified_since": self.if_modified_since,
        }


@dataclass
class _SiteState:
    """Everything the control API changes; handler threads share it under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pages: dict[int, _Page] = field(default_factory=dict)
    scripts: dict[int, deque[_ScriptedResponse]] = field(default_factory=dict)
    hits: Counter[int] = field(default_factory=Counter)
    robots: _ScriptedResponse | None = None
    behaviour: _Behaviour = field(default_factory=_Behaviour)
    log: list[_LoggedRequest] = field(default_factory=list)
    in_flight: int = 0
    recent_arrivals: deque[float] = field(default_factory=deque)


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
    # An answer goes out in one write when the handler is done (handle_one_request flushes),
    # not its headers and its body apart: two small writes meet the client's delayed ACK
    # (Nagle's algorithm) and every answer came 40 ms late.
    wbufsize = 64 * 1024
    server: SampleSiteServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path, query = self._target()
        if path.startswith("/_control/") and self.server.control:
            if path == "/_control/hits":
                self._serve_hits()
            elif path == "/_control/log":
                self._serve_log()
            else:
                self._not_found()
            return
        self._entry = self._arrive(path, query)
        try:
            if self._entry.status == HTTPStatus.TOO_MANY_REQUESTS:
                retry_after = str(self.server.state.behaviour.retry_after)
                self._send(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    b"slow down",
                    "text/plain; charset=utf-8",
                    {"Retry-After": retry_after},
                )
            elif path == "/robots.txt":
                self._serve_robots()
            elif path == "/projects":
                self._serve_projects(query)
            else:
                self._not_found()
        finally:
            self._depart(0)  # an answer that failed half-way still leaves
            self._entry = None

    _entry: _LoggedRequest | None = None

    def _arrive(self, path: str, query: str) -> _LoggedRequest:
        """Log the request's arrival; mark it 429 when it is over the site's rate or
        concurrency cap (it still counts: a site counts what arrives)."""
        now = time.time()
        entry = _LoggedRequest(
            path + (f"?{query}" if query else ""),
            now,
            self.headers.get("User-Agent", ""),
            self.headers.get("If-None-Match"),
            self.headers.get("If-Modified-Since"),
        )
        state = self.server.state
        with state.lock:
            behaviour = state.behaviour
            state.in_flight += 1
            arrivals = state.recent_arrivals
            arrivals.append(now)
            while arrivals and arrivals[0] <= now - 1.0:
                arrivals.popleft()
            over_rate = (
                behaviour.max_requests_per_second is not None
                and len(arrivals) > behaviour.max_requests_per_second
            )
            over_concurrency = (
                behaviour.max_concurrency is not None
                and state.in_flight > behaviour.max_concurrency
            )
            if over_rate or over_concurrency:
                entry.status = HTTPStatus.TOO_MANY_REQUESTS
            if self.server.control:  # only tests read the log; a public site must not grow it
                state.log.append(entry)
        return entry

    def _depart(self, status: int) -> None:
        """The request leaves the site's count: called just before its answer goes out, so a
        client that has its whole answer has always been counted out."""
        entry = self._entry
        if entry is None or entry.departure:
            return
        with self.server.state.lock:
            self.server.state.in_flight -= 1
            entry.departure = time.time()
            if status and entry.status != HTTPStatus.TOO_MANY_REQUESTS:
                entry.status = status

    def do_PUT(self) -> None:
        path, _ = self._target()
        match = _CONTROL_PAGE_PATH.fullmatch(path)
        if not self.server.control or (
            match is None and path not in ("/_control/robots", "/_control/behaviour")
        ):
            self._not_found()
            return
        body = self._read_body()
        if body is None:
            return
        state = self.server.state
        try:
            if match is not None:
                page = _Page(
                    body,
                    self.headers.get(SERVE_CONTENT_TYPE_HEADER, HTML_CONTENT_TYPE),
                    formatdate(time.time(), usegmt=True),
                )
                with state.lock:
                    state.pages[int(match.group(1))] = page
            elif path == "/_control/robots":
                robots = _parse_response(_json_object(body))
                with state.lock:
                    state.robots = robots
            else:
                with state.lock:
                    state.behaviour = _parse_behaviour(body, state.behaviour)
        except _BadRequest as exc:
            self._send(HTTPStatus.BAD_REQUEST, str(exc).encode(), "text/plain; charset=utf-8")
            return
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
                state.robots = None
                state.behaviour = _Behaviour()
                state.log.clear()
                state.recent_arrivals.clear()
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

    def _serve_robots(self) -> None:
        with self.server.state.lock:
            robots = self.server.state.robots
        if robots is None:
            self._not_found()  # RFC 9309: no robots.txt, no rules
        else:
            self._send_scripted(robots)

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
            behaviour = state.behaviour
        if scripted is not None:
            self._send_scripted(scripted)
            return
        if behaviour.delay > 0:
            time.sleep(behaviour.delay)  # outside the lock: other requests go on meanwhile
        if stored is not None:
            self._send_page(stored, behaviour.validators)
        elif 1 <= page <= behaviour.pages:
            body = render_listing(sample_page(page, pages=behaviour.pages)).encode()
            self._send_page(_Page(body, HTML_CONTENT_TYPE, _LAST_MODIFIED), behaviour.validators)
        else:
            self._not_found()

    def _send_page(self, page: _Page, validators: bool) -> None:
        if not validators:
            self._send(HTTPStatus.OK, page.body, page.content_type)
            return
        etag = '"' + hashlib.sha256(page.body).hexdigest()[:20] + '"'
        headers = {"ETag": etag, "Last-Modified": page.modified}
        if _not_modified(etag, page.modified, self.headers):
            self._send(HTTPStatus.NOT_MODIFIED, headers=headers)
        else:
            self._send(HTTPStatus.OK, page.body, page.content_type, headers)

    def _serve_hits(self) -> None:
        with self.server.state.lock:
            hits = {str(page): count for page, count in sorted(self.server.state.hits.items())}
        self._send(HTTPStatus.OK, json.dumps(hits).encode(), "application/json")

    def _serve_log(self) -> None:
        with self.server.state.lock:
            log = [entry.as_json() for entry in self.server.state.log]
        self._send(HTTPStatus.OK, json.dumps(log).encode(), "application/json")

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
        self._depart(scripted.status)
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

    def _send(
        self,
        status: HTTPStatus,
        body: bytes = b"",
        content_type: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            self.send_header("Content-Length", str(len(body)))
        # Headers are buffered until end_headers: the client has nothing of the answer yet.
        self._depart(status)
        self.end_headers()
        self.wfile.write(body)


def _not_modified(etag: str, modified: str, headers: Any) -> bool:
    """RFC 9110 section 13.2.2: If-None-Match decides when present, else If-Modified-Since."""
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or etag in tags
    since = headers.get("If-Modified-Since")
    if since is None:
        return False
    try:
        return parsedate_to_datetime(since) >= parsedate_to_datetime(modified)
    except (TypeError, ValueError):
        return False


def _parse_script(body: bytes) -> tuple[int, list[_ScriptedResponse]]:
    document = _json_object(body)
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


def _parse_behaviour(body: bytes, current: _Behaviour) -> _Behaviour:
    document = _json_object(body)
    values: dict[str, Any] = {}
    for name, kind in (("pages", int), ("delay", float), ("retry_after", int)):
        if name in document:
            value = document[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise _BadRequest(f"{name} must be a non-negative number")
            values[name] = kind(value)
    for name in ("max_requests_per_second", "max_concurrency"):
        if name in document:
            value = document[name]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise _BadRequest(f"{name} must be a positive integer or null")
            values[name] = value
    if "validators" in document:
        if not isinstance(document["validators"], bool):
            raise _BadRequest("validators must be true or false")
        values["validators"] = document["validators"]
    unknown = set(document) - set(values)
    if unknown:
        raise _BadRequest(f"unknown keys: {sorted(unknown)}")
    return dataclasses.replace(current, **values)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadRequest(f"body must be JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise _BadRequest("body must be a JSON object")
    return document

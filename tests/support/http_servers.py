"""Local HTTP servers in threads, to fetch from: the sample site and a raw socket server.

`running_sample_site` runs the real sample site (with its control API) in a thread.
`raw_http_server` answers with whatever bytes a test writes to the socket, for the misbehaviours
the sample site cannot script: endless redirects, gzip bombs, bodies without a length, bodies
that drip, connections reset halfway.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import socketserver
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from sample_site.server import SERVE_CONTENT_TYPE_HEADER, make_server

logger = logging.getLogger(__name__)

# shutdown() waits up to one poll interval; short, since every test starts its own server.
POLL_INTERVAL_SECONDS = 0.02


# --- the sample site ----------------------------------------------------------------------------


class SampleSite:
    """A running sample site: URLs of its pages and its control API."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.base_url = f"http://{host}:{port}"
        # trust_env=False: a proxy from the environment must not sit between a test and localhost.
        self.control = httpx.Client(base_url=self.base_url, timeout=5.0, trust_env=False)

    def page_url(self, page: int) -> str:
        return f"{self.base_url}/projects?page={page}"

    def put_page(self, page: int, body: bytes, content_type: str) -> None:
        response = self.control.put(
            f"/_control/pages/{page}",
            content=body,
            headers={SERVE_CONTENT_TYPE_HEADER: content_type},
        )
        assert response.status_code == 204, response.text

    def script(self, page: int, *responses: Mapping[str, Any]) -> None:
        response = self.control.post(
            "/_control/script", json={"page": page, "responses": list(responses)}
        )
        assert response.status_code == 204, response.text

    def hits(self) -> dict[str, int]:
        hits: dict[str, int] = self.control.get("/_control/hits").json()
        return hits


@contextlib.contextmanager
def running_sample_site(host: str = "127.0.0.1") -> Iterator[SampleSite]:
    """The sample site with its control API on, on a free port of `host`, in a thread."""
    server = make_server((host, 0), control=True)
    thread = threading.Thread(
        target=server.serve_forever, args=(POLL_INTERVAL_SECONDS,), daemon=True
    )
    thread.start()
    site = SampleSite(host, int(server.server_address[1]))
    try:
        yield site
    finally:
        site.control.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- a server that writes raw bytes -------------------------------------------------------------


@dataclass
class RawExchange:
    """One request to a `RawServer`: what was asked, and the socket to answer on."""

    sock: socket.socket
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    server: RawServer

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_head(self, status: str = "200 OK", headers: Mapping[str, str] | None = None) -> None:
        """The status line and headers; every answer closes its connection afterwards."""
        lines = [f"HTTP/1.1 {status}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def reset(self) -> None:
        """Abort the connection: a linger of 0 makes close() send RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


RawResponder = Callable[[RawExchange], None]


class _RawRequestHandler(socketserver.StreamRequestHandler):
    server: RawServer

    def handle(self) -> None:
        request_line = self.rfile.readline(65537).decode("latin-1").strip()
        if not request_line:
            return
        headers: dict[str, str] = {}
        while True:
            line = self.rfile.readline(65537).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        method, path, _version = request_line.split(" ", 2)
        with self.server.lock:
            self.server.requests.append(path)
        self.server.respond(RawExchange(self.request, method, path, headers, self.server))


class RawServer(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 server in name only: `respond` writes every byte of every answer itself."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, respond: RawResponder) -> None:
        self.respond = respond
        self.lock = threading.Lock()
        self.requests: list[str] = []  # request targets, in arrival order
        # Set when the test is over: responders that loop (a dripping body) stop on it.
        self.stopping = threading.Event()
        super().__init__((host, 0), _RawRequestHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def requested(self) -> list[str]:
        with self.lock:
            return list(self.requests)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The client hanging up on a dripping or oversized answer is what the tests provoke.
        logger.debug("raw exchange with %s ended early", client_address, exc_info=True)


@contextlib.contextmanager
def raw_http_server(respond: RawResponder, host: str = "127.0.0.1") -> Iterator[RawServer]:
    """A `RawServer` on a free port of `host`, serving in a thread until the block ends."""
    server = RawServer(host, respond)
    thread = threading.Thread(
        target=server.serve_forever, args=(POLL_INTERVAL_SECONDS,), daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@functools.cache
def gzip_of_zeros(size: int) -> bytes:
    """`size` zero bytes, gzip-compressed (about 1,000 times smaller): a decompression bomb."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip framing
    block = bytes(1024 * 1024)
    parts = [compressor.compress(block) for _ in range(size // len(block))]
    parts.append(compressor.compress(bytes(size % len(block))))
    parts.append(compressor.flush())
    return b"".join(parts)

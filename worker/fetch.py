"""Fetch one listing page (or a robots.txt) over HTTP, within bounds of time, size, redirects
and hosts; conditionally when the page's validators are known (a 304 is `not_modified`).

httpx errors are translated here into `RetryableError` (5xx, 429, 408, timeouts, connection
loss) and `PermanentError` (other 4xx, too many redirects, a redirect off the source's host,
a body over the limit, a non-HTML answer). When to fetch is `worker.source`'s business.
"""

from __future__ import annotations

import asyncio
import email.utils
import http.cookiejar
import itertools
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from worker.errors import PermanentError, RetryableError
from worker.robots import MAX_ROBOTS_BYTES, RobotsAnswer

log = logging.getLogger(__name__)

HTML_TYPES = ("text/html", "application/xhtml+xml")

# httpcore's trace extension: called with each step of an exchange, before it is taken.
Trace = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class FetchLimits:
    timeout: float
    max_bytes: int
    max_redirects: int


@dataclass(frozen=True, slots=True)
class Validators:
    """What a page's answer said to send back next time (RFC 9110 conditional requests)."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)

    def request_headers(self) -> dict[str, str]:
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass(frozen=True, slots=True)
class FetchedPage:
    url: str  # after redirects: the base for relative links
    body: bytes
    encoding: str | None  # the charset the Content-Type header declared, if any
    validators: Validators = Validators()
    not_modified: bool = False  # a 304 to a conditional request: no body, nothing to parse


# Content-Encoding -> a bounded decompressor (None: the body is taken as it comes).
_DECODERS: dict[str, Callable[[], Any]] = {
    "identity": lambda: None,
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "deflate": zlib.decompressobj,
}


class OffHostRedirect(PermanentError):
    """A redirect pointed away from the source's host; not followed."""


def make_client(
    limits: FetchLimits, source_url: str, max_connections: int, user_agent: str
) -> httpx.AsyncClient:
    """The worker process's one HTTP client, which only ever talks to the source's origin."""
    source = httpx.URL(source_url.replace("{page}", "1"))
    origin = (source.scheme, source.host, source.port)

    refused = itertools.count(1)

    async def refuse_other_origins(request: httpx.Request) -> None:
        # Scheme and port too: a same-host redirect to :6379 or to plain http is not the source.
        url = request.url
        if (url.scheme, url.host, url.port) != origin:
            log.warning(
                "refused a redirect to %s (%d refused by this process)",
                url.netloc.decode(),
                next(refused),
            )
            raise OffHostRedirect(
                f"refused to follow a redirect to {url.scheme}://{url.netloc.decode()}: only "
                f"{source.scheme}://{source.netloc.decode()}, the source, is fetched"
            )

    return httpx.AsyncClient(
        timeout=httpx.Timeout(limits.timeout),
        follow_redirects=True,
        max_redirects=limits.max_redirects,
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        headers={
            "User-Agent": user_agent,
            "Accept": "text/html,application/xhtml+xml",
            # Only the codings `_read_bounded` inflates under its own limit.
            "Accept-Encoding": ", ".join(coding for coding in _DECODERS if coding != "identity"),
        },
        event_hooks={"request": [refuse_other_origins]},
        # One client serves every task of the process: no site may grow a shared cookie jar.
        cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
    )


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _check_status(response: httpx.Response) -> None:
    code = response.status_code
    if 200 <= code < 300 or code == 304:
        return
    said = f"source answered {code} {response.reason_phrase} for {response.url}"
    if code == 429 or code >= 500 or code == 408:
        # RFC 9110 lets 503 (and any of these) say when to come back; honour it when said.
        raise RetryableError(said, retry_after_seconds(response.headers.get("Retry-After")))
    raise PermanentError(said)


def _check_type(response: httpx.Response) -> None:
    content_type = response.headers.get("Content-Type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type not in HTML_TYPES:
        raise PermanentError(
            f"source answered {media_type!r} for {response.url}, not an HTML listing page"
        )


async def _read_bounded(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length", "")
    too_big = f"page {response.url} is larger than the {max_bytes}-byte limit (FETCH_MAX_BYTES)"
    if declared.isdigit() and int(declared) > max_bytes:
        raise PermanentError(too_big)
    coding = response.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if coding not in _DECODERS:
        raise PermanentError(f"source answered {response.url} in an unknown encoding {coding!r}")
    decoder = _DECODERS[coding]()
    chunks: list[bytes] = []
    size = 0
    # Inflated here, never more than the limit allows at a time: httpx's own decoder inflates
    # a whole network chunk at once, and 64 kB of a gzip bomb is 64 MB of memory.
    async for raw in response.aiter_raw():
        data = raw
        while data:
            chunk = decoder.decompress(data, max_bytes - size + 1) if decoder else data
            data = decoder.unconsumed_tail if decoder else b""
            size += len(chunk)
            if size > max_bytes:
                raise PermanentError(too_big)
            chunks.append(chunk)
    return b"".join(chunks)


async def fetch_page(
    client: httpx.AsyncClient,
    url: str,
    limits: FetchLimits,
    validators: Validators | None = None,
    trace: Trace | None = None,
) -> FetchedPage:
    """GET `url`; with `validators`, conditionally: a 304 comes back as `not_modified`.
    `trace` is httpcore's trace extension: it may stop the request before it is sent."""
    headers = validators.request_headers() if validators else {}
    extensions = {"trace": trace} if trace else {}
    try:
        # One deadline for the whole exchange, redirects and a slowly dripping body included.
        async with (
            asyncio.timeout(limits.timeout),
            client.stream("GET", url, headers=headers, extensions=extensions) as response,
        ):
            _check_status(response)
            fresh = Validators(response.headers.get("ETag"), response.headers.get("Last-Modified"))
            if response.status_code == 304:
                if not validators:
                    raise PermanentError(f"source answered 304 to an unconditional GET of {url}")
                # RFC 9110: a 304 may repeat the validators; when it does not, the old ones hold.
                return FetchedPage(
                    str(response.url), b"", None, fresh or validators or Validators(), True
                )
            _check_type(response)
            body = await _read_bounded(response, limits.max_bytes)
            return FetchedPage(str(response.url), body, response.charset_encoding, fresh)
    except TimeoutError as exc:
        raise RetryableError(f"source did not answer {url} within {limits.timeout:g} s") from exc
    except httpx.TooManyRedirects as exc:
        raise PermanentError(
            f"more than {limits.max_redirects} redirects from {url} (FETCH_MAX_REDIRECTS)"
        ) from exc
    except httpx.TimeoutException as exc:
        raise RetryableError(f"source timed out on {url}: {type(exc).__name__}") from exc
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        # A redirect to something that is not an http(s) URL: trying again cannot help.
        raise PermanentError(f"{url} redirected to an unfetchable location: {exc}") from exc
    except (httpx.DecodingError, zlib.error) as exc:
        raise PermanentError(f"could not decode the body of {url}: {exc}") from exc
    except httpx.TransportError as exc:
        raise RetryableError(f"connection to the source failed on {url}: {exc!r}") from exc


async def fetch_robots(
    client: httpx.AsyncClient, url: str, limits: FetchLimits, trace: Trace | None = None
) -> RobotsAnswer:
    """GET a robots.txt: its status and (first MAX_ROBOTS_BYTES of) text; 0 when unreachable.

    Never raises for what the host answered: RFC 9309 gives every answer a meaning.
    """
    extensions = {"trace": trace} if trace else {}
    try:
        async with (
            asyncio.timeout(limits.timeout),
            client.stream("GET", url, extensions=extensions) as response,
        ):
            if not 200 <= response.status_code < 300:
                return RobotsAnswer(response.status_code, reason=response.reason_phrase)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size >= MAX_ROBOTS_BYTES:
                    break
            text = b"".join(chunks)[:MAX_ROBOTS_BYTES].decode("utf-8", errors="replace")
            return RobotsAnswer(response.status_code, text)
    except TimeoutError:
        return RobotsAnswer(0, reason=f"no answer within {limits.timeout:g} s")
    except (httpx.HTTPError, PermanentError) as exc:
        # A refused redirect (off the source's origin) included: unreachable as far as we go.
        return RobotsAnswer(0, reason=f"{type(exc).__name__}: {exc}")

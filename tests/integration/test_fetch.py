"""fetch_page against real local HTTP servers: statuses, redirects, limits and broken connections.

The sample site (in a thread) serves scripted answers; a raw socket server
(tests.support.http_servers) does what the sample site cannot: endless redirects, gzip bombs,
unbounded or dripping bodies, resets halfway through a body.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import time
from collections.abc import Iterator

import httpx
import pytest

from sample_site.pages import render_listing, sample_page
from tests.support.http_servers import (
    RawExchange,
    SampleSite,
    gzip_of_zeros,
    raw_http_server,
    running_sample_site,
)
from tests.support.processes import free_port
from worker.errors import PermanentError, RetryableError
from worker.fetch import (
    FetchedPage,
    FetchLimits,
    OffHostRedirect,
    Validators,
    fetch_page,
    fetch_robots,
    make_client,
)
from worker.robots import MAX_ROBOTS_BYTES, RobotsAnswer

HOST = "127.0.0.1"
OTHER_HOST = "127.0.0.2"  # the whole of 127.0.0.0/8 is loopback on Linux
PAGE = b"<html><body><div class='project'>ok</div></body></html>"
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # make_client trusts the environment; a developer's proxy must not answer for localhost.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def site() -> Iterator[SampleSite]:
    """The sample site with its control API, on 127.0.0.1."""
    with running_sample_site(HOST) as running:
        yield running


def fetch(
    url: str,
    *,
    source_host: str = HOST,
    timeout: float = 5.0,
    max_bytes: int = MB,
    max_redirects: int = 3,
) -> FetchedPage:
    """fetch_page with a fresh client of the worker's kind, on an event loop of its own."""
    limits = FetchLimits(timeout=timeout, max_bytes=max_bytes, max_redirects=max_redirects)

    async def run() -> FetchedPage:
        # The source is the fetched URL's origin, on `source_host`.
        source = str(httpx.URL(url).copy_with(host=source_host))
        async with make_client(
            limits, source, max_connections=4, user_agent="test-agent/1"
        ) as client:
            return await fetch_page(client, url, limits)

    return asyncio.run(run())


# --- answers the source gives -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "encoding"),
    [
        ("text/html; charset=windows-1251", "windows-1251"),
        ("text/html", None),
        ("application/xhtml+xml; charset=utf-8", "utf-8"),
    ],
)
def test_200_returns_body_final_url_and_header_charset(
    site: SampleSite, content_type: str, encoding: str | None
) -> None:
    body = "<p>\u041f\u0440\u0438\u0432\u0435\u0442</p>".encode("windows-1251")
    site.put_page(7, body, content_type)

    page = fetch(site.page_url(7))

    assert page == FetchedPage(url=site.page_url(7), body=body, encoding=encoding)


def test_sample_listing_is_fetched_whole(site: SampleSite) -> None:
    page = fetch(site.page_url(1))

    assert page.body == render_listing(sample_page(1)).encode()
    assert page.encoding == "utf-8"
    assert site.hits() == {"1": 1}


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_server_errors_and_408_are_retryable_and_name_the_status(
    site: SampleSite, status: int
) -> None:
    site.script(3, {"status": status, "body": "busy"})

    with pytest.raises(RetryableError, match=rf"\b{status}\b") as caught:
        fetch(site.page_url(3))

    assert site.page_url(3) in str(caught.value)
    assert caught.value.retry_after is None


def test_429_with_retry_after_seconds_says_when(site: SampleSite) -> None:
    site.script(3, {"status": 429, "headers": {"Retry-After": "3"}, "body": "slow down"})

    with pytest.raises(RetryableError, match=r"\b429\b") as caught:
        fetch(site.page_url(3))

    assert caught.value.retry_after == 3.0


def test_429_with_retry_after_http_date_says_when(site: SampleSite) -> None:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    site.script(
        3,
        {"status": 429, "headers": {"Retry-After": email.utils.format_datetime(when, usegmt=True)}},
    )

    with pytest.raises(RetryableError) as caught:
        fetch(site.page_url(3))

    # An HTTP date has whole seconds, and some time passes between writing and reading it.
    assert caught.value.retry_after is not None
    assert 25.0 <= caught.value.retry_after <= 30.0


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (None, None),  # no opinion
        ("soon", None),  # unreadable: no opinion either
        ("-1", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: at once
    ],
)
def test_429_without_a_usable_future_retry_after(
    site: SampleSite, retry_after: str | None, expected: float | None
) -> None:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    site.script(3, {"status": 429, "headers": headers})

    with pytest.raises(RetryableError) as caught:
        fetch(site.page_url(3))

    assert caught.value.retry_after == expected


def test_503_with_retry_after_says_when(site: SampleSite) -> None:
    site.script(3, {"status": 503, "headers": {"Retry-After": "7"}})

    with pytest.raises(RetryableError) as caught:
        fetch(site.page_url(3))

    assert caught.value.retry_after == 7.0


def test_404_is_permanent_and_names_status_and_url(site: SampleSite) -> None:
    url = site.page_url(99_999)

    with pytest.raises(PermanentError, match=r"\b404\b") as caught:
        fetch(url)

    assert not isinstance(caught.value, RetryableError)
    assert url in str(caught.value)


@pytest.mark.parametrize("status", [400, 401, 403, 410, 451])
def test_other_4xx_are_permanent(site: SampleSite, status: int) -> None:
    site.script(4, {"status": status})

    with pytest.raises(PermanentError, match=rf"\b{status}\b"):
        fetch(site.page_url(4))


@pytest.mark.parametrize(
    "content_type", ["application/json", "image/png", "text/plain; charset=utf-8"]
)
def test_non_html_answer_is_permanent(site: SampleSite, content_type: str) -> None:
    site.put_page(5, b"{}", content_type)

    with pytest.raises(PermanentError, match="not an HTML"):
        fetch(site.page_url(5))


# --- redirects ----------------------------------------------------------------------------------


def test_redirects_within_the_limit_are_followed_and_the_final_url_reported(
    site: SampleSite,
) -> None:
    site.script(1, {"status": 302, "headers": {"Location": "/projects?page=2"}})
    site.script(2, {"status": 301, "headers": {"Location": site.page_url(3)}})
    site.put_page(3, PAGE, "text/html; charset=utf-8")

    page = fetch(site.page_url(1), max_redirects=2)

    assert page.url == site.page_url(3)
    assert page.body == PAGE
    assert site.hits() == {"1": 1, "2": 1, "3": 1}


def test_one_redirect_past_the_limit_is_permanent(site: SampleSite) -> None:
    site.script(1, {"status": 302, "headers": {"Location": "/projects?page=2"}})
    site.script(2, {"status": 302, "headers": {"Location": "/projects?page=3"}})
    site.script(3, {"status": 302, "headers": {"Location": "/projects?page=4"}})

    with pytest.raises(PermanentError, match="redirects"):
        fetch(site.page_url(1), max_redirects=2)

    assert "4" not in site.hits()


def test_redirect_loop_is_permanent_and_bounded() -> None:
    def loop(exchange: RawExchange) -> None:
        exchange.send_head("302 Found", {"Location": exchange.path, "Content-Length": "0"})

    with raw_http_server(loop) as server:
        with pytest.raises(PermanentError, match="redirects") as caught:
            fetch(f"{server.base_url}/projects?page=1", max_redirects=4)

        assert len(server.requested()) == 5  # the first request and 4 redirects
    assert "FETCH_MAX_REDIRECTS" in str(caught.value)


@pytest.mark.parametrize("other", [OTHER_HOST, "localhost"])
def test_redirect_to_another_host_is_refused_before_any_request(
    site: SampleSite, other: str
) -> None:
    # "localhost" names the same server under another host name; 127.0.0.2 is a second server.
    with running_sample_site(OTHER_HOST) as elsewhere:
        target = elsewhere if other == OTHER_HOST else site
        location = f"http://{other}:{target.port}/projects?page=2"
        site.script(1, {"status": 302, "headers": {"Location": location}})

        with pytest.raises(OffHostRedirect, match=other) as caught:
            fetch(site.page_url(1))

        assert isinstance(caught.value, PermanentError)
        assert elsewhere.hits() == {}
        assert site.hits() == {"1": 1}


def test_redirect_to_another_port_of_the_same_host_is_refused(site: SampleSite) -> None:
    # Same host, another service on it (say Redis on 6379): not the source either.
    with running_sample_site(HOST) as neighbour:
        location = f"http://{HOST}:{neighbour.port}/projects?page=2"
        site.script(1, {"status": 302, "headers": {"Location": location}})

        with pytest.raises(OffHostRedirect, match=str(neighbour.port)):
            fetch(site.page_url(1))

        assert neighbour.hits() == {}


@pytest.mark.parametrize(
    "location",
    [
        "ftp://elsewhere.invalid/list",
        "ftp://127.0.0.1/list",
        "mailto:someone@example.test",
    ],
)
def test_redirect_to_an_unfetchable_url_is_permanent(site: SampleSite, location: str) -> None:
    site.script(1, {"status": 302, "headers": {"Location": location}})

    with pytest.raises(PermanentError):
        fetch(site.page_url(1))

    assert site.hits() == {"1": 1}


# --- size limits --------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_permanent(site: SampleSite) -> None:
    site.put_page(6, b"x" * 2049, "text/html")
    site.put_page(7, b"x" * 2048, "text/html")

    with pytest.raises(PermanentError, match="2048-byte limit"):
        fetch(site.page_url(6), max_bytes=2048)
    assert len(fetch(site.page_url(7), max_bytes=2048).body) == 2048


@pytest.mark.parametrize("framing", ["close-delimited", "chunked"])
def test_body_over_the_limit_without_content_length_is_permanent(framing: str) -> None:
    block = b"<p>" + b"x" * (64 * 1024 - 3)

    def endless(exchange: RawExchange) -> None:
        if framing == "chunked":
            exchange.send_head(
                headers={"Content-Type": "text/html", "Transfer-Encoding": "chunked"}
            )
            frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
        else:
            exchange.send_head(headers={"Content-Type": "text/html"})
            frame = block
        for _ in range(64):  # 4 MB, four times the limit
            if exchange.server.stopping.is_set():
                return
            exchange.send(frame)

    with raw_http_server(endless) as server:
        started = time.monotonic()
        with pytest.raises(PermanentError, match="larger than"):
            fetch(f"{server.base_url}/projects?page=1", max_bytes=MB)
        assert time.monotonic() - started < 5.0


def test_gzip_bomb_is_stopped_at_the_limit_quickly() -> None:
    bomb = gzip_of_zeros(50 * MB)

    def answer(exchange: RawExchange) -> None:
        exchange.send_head(
            headers={
                "Content-Type": "text/html",
                "Content-Encoding": "gzip",
                "Content-Length": str(len(bomb)),
            }
        )
        exchange.send(bomb)

    assert len(bomb) < MB  # the declared length alone would pass

    with raw_http_server(answer) as server:
        started = time.monotonic()
        with pytest.raises(PermanentError, match="larger than"):
            fetch(f"{server.base_url}/projects?page=1", max_bytes=MB)
        assert time.monotonic() - started < 3.0


def test_small_gzipped_page_is_decoded() -> None:
    small = gzip_of_zeros(100 * 1024)

    def answer(exchange: RawExchange) -> None:
        exchange.send_head(
            headers={
                "Content-Type": "text/html",
                "Content-Encoding": "gzip",
                "Content-Length": str(len(small)),
            }
        )
        exchange.send(small)

    with raw_http_server(answer) as server:
        page = fetch(f"{server.base_url}/projects?page=1", max_bytes=MB)

    assert page.body == bytes(100 * 1024)


# --- time and broken connections ----------------------------------------------------------------


def test_slowly_dripping_body_past_the_deadline_is_retryable() -> None:
    def drip(exchange: RawExchange) -> None:
        exchange.send_head(headers={"Content-Type": "text/html", "Content-Length": "100000"})
        # Each byte comes well within any per-read timeout; only a deadline for the whole
        # exchange stops this.
        while not exchange.server.stopping.wait(0.05):
            exchange.send(b"<")

    with raw_http_server(drip) as server:
        started = time.monotonic()
        with pytest.raises(RetryableError, match=r"within 0\.5 s"):
            fetch(f"{server.base_url}/projects?page=1", timeout=0.5)
        assert time.monotonic() - started < 2.0


def test_slow_headers_past_the_deadline_are_retryable(site: SampleSite) -> None:
    site.script(2, {"status": 200, "headers": {"Content-Type": "text/html"}, "delay": 1.0})

    with pytest.raises(RetryableError):
        fetch(site.page_url(2), timeout=0.3)


def test_connection_refused_is_retryable() -> None:
    url = f"http://{HOST}:{free_port(HOST)}/projects?page=1"

    with pytest.raises(RetryableError, match="connection to the source failed"):
        fetch(url)


def test_connection_reset_mid_body_is_retryable() -> None:
    def reset(exchange: RawExchange) -> None:
        exchange.send_head(headers={"Content-Type": "text/html", "Content-Length": "100000"})
        exchange.send(b"<html>" + b"x" * 1000)
        time.sleep(0.1)  # let the client read the head and start on the body
        exchange.reset()

    with raw_http_server(reset) as server:
        with pytest.raises(RetryableError) as caught:
            fetch(f"{server.base_url}/projects?page=1")

        assert len(server.requested()) == 1
    assert not isinstance(caught.value, PermanentError)


def test_body_cut_short_by_the_server_is_retryable(site: SampleSite) -> None:
    # The script declares more than it sends, and the site then closes the connection.
    site.script(
        2,
        {
            "status": 200,
            "headers": {"Content-Type": "text/html", "Content-Length": "5000"},
            "body": "<html>truncated",
        },
    )

    with pytest.raises(RetryableError):
        fetch(site.page_url(2))


# --- what the worker's client sends and keeps ---------------------------------------------------


def test_an_encoding_it_cannot_inflate_under_the_limit_is_permanent(site: SampleSite) -> None:
    site.script(
        1, {"status": 200, "headers": {"Content-Encoding": "br", "Content-Type": "text/html"}}
    )

    with pytest.raises(PermanentError, match="unknown encoding 'br'"):
        fetch(site.page_url(1))


async def test_the_client_asks_only_for_codings_it_inflates_and_keeps_no_cookies() -> None:
    seen: list[dict[str, str]] = []

    def answer(exchange: RawExchange) -> None:
        seen.append(exchange.headers)
        exchange.send_head(
            headers={"Content-Type": "text/html", "Content-Length": "0", "Set-Cookie": "s=1"}
        )

    with raw_http_server(answer) as server:
        limits = FetchLimits(timeout=5, max_bytes=MB, max_redirects=1)
        url = f"{server.base_url}/projects?page=1"
        async with make_client(limits, url, max_connections=1, user_agent="test-agent/1") as client:
            await fetch_page(client, url, limits)
            await fetch_page(client, url, limits)

    assert [h.get("accept-encoding") for h in seen] == ["gzip, x-gzip, deflate"] * 2
    assert "cookie" not in seen[1], "a site's cookie was kept and sent back"


# --- conditional GET, robots.txt, the User-Agent ------------------------------------------------


def behave(site: SampleSite, **behaviour: object) -> None:
    response = site.control.put("/_control/behaviour", json=behaviour)
    assert response.status_code == 204, response.text


def site_log(site: SampleSite) -> list[dict[str, object]]:
    log: list[dict[str, object]] = site.control.get("/_control/log").json()
    return log


async def fetch_with(url: str, validators: Validators | None = None) -> FetchedPage:
    limits = FetchLimits(timeout=5, max_bytes=MB, max_redirects=1)
    async with make_client(limits, url, max_connections=1, user_agent="test-agent/1") as client:
        return await fetch_page(client, url, limits, validators)


async def test_validators_are_kept_and_sent_back_and_a_304_is_not_modified(
    site: SampleSite,
) -> None:
    behave(site, validators=True)
    first = await fetch_with(site.page_url(2))
    assert first.validators.etag and first.validators.last_modified and not first.not_modified

    again = await fetch_with(site.page_url(2), first.validators)

    assert again.not_modified and again.body == b""
    assert again.validators == first.validators
    sent = site_log(site)
    assert [entry["status"] for entry in sent] == [200, 304]
    assert sent[1]["if_none_match"] == first.validators.etag
    assert sent[1]["if_modified_since"] == first.validators.last_modified
    assert {entry["user_agent"] for entry in sent} == {"test-agent/1"}
    # A stale ETag: the page is sent again, whole.
    stale = Validators(etag='"not-the-page"')
    assert (await fetch_with(site.page_url(2), stale)).body == first.body


async def test_a_304_to_an_unconditional_get_is_permanent(site: SampleSite) -> None:
    site.script(1, {"status": 304})
    with pytest.raises(PermanentError, match="304 to an unconditional GET"):
        await fetch_with(site.page_url(1))


async def robots(url: str, deadline: float = 5.0) -> RobotsAnswer:
    limits = FetchLimits(timeout=deadline, max_bytes=MB, max_redirects=1)
    async with make_client(limits, url, max_connections=1, user_agent="test-agent/1") as client:
        return await fetch_robots(client, url, limits)


async def test_robots_txt_answers_each_have_a_meaning(site: SampleSite) -> None:
    url = f"{site.base_url}/robots.txt"
    assert await robots(url) == RobotsAnswer(404, reason="Not Found")
    for status in (200, 503):
        document = {"status": status, "body": "User-agent: *\nDisallow: /x\n"}
        assert site.control.put("/_control/robots", json=document).status_code == 204
        answer = await robots(url)
        assert answer.status == status
        assert answer.body == (document["body"] if status == 200 else "")
    document = {"status": 200, "body": "", "delay": 2}
    assert site.control.put("/_control/robots", json=document).status_code == 204
    slow = await robots(url, deadline=0.3)
    assert slow.status == 0 and "no answer within 0.3 s" in slow.reason
    refused = await robots(f"http://{HOST}:{free_port()}/robots.txt")
    assert refused.status == 0 and "ConnectError" in refused.reason


async def test_robots_txt_is_read_up_to_500_kib() -> None:
    line = b"Disallow: /" + b"x" * 1000 + b"\n"
    body = b"User-agent: *\n" + line * 1000  # about 1 MB

    def answer(exchange: RawExchange) -> None:
        exchange.send_head(headers={"Content-Type": "text/plain", "Content-Length": str(len(body))})
        exchange.send(body)

    with raw_http_server(answer) as server:
        read = await robots(f"{server.base_url}/robots.txt")
    assert read.status == 200 and len(read.body) == MAX_ROBOTS_BYTES

"""The sample site serves its listing and obeys its control API (sample_site.server).

Served in a thread and as `python -m sample_site`; the pages themselves are checked without a
server in tests/unit/test_sample_pages.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from core.settings import SourceProfile
from sample_site.pages import SAMPLE_PAGES, render_listing, sample_page
from sample_site.server import make_server
from worker.parse import parse_listing

ROOT = Path(__file__).resolve().parents[2]


def _serve(control: bool) -> Iterator[httpx.Client]:
    server = make_server(("127.0.0.1", 0), control=control)
    # A short poll interval: shutdown() waits up to one interval, once per test.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    # trust_env=False: a proxy from the environment must not sit between a test and localhost.
    client = httpx.Client(base_url=f"http://{host!s}:{port}", timeout=5.0, trust_env=False)
    try:
        yield client
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def control_site() -> Iterator[httpx.Client]:
    """A client for a running sample site with the control API on."""
    yield from _serve(control=True)


@pytest.fixture
def plain_site() -> Iterator[httpx.Client]:
    """A client for a running sample site with the control API off."""
    yield from _serve(control=False)


def test_page_one_parses_into_ten_items(control_site: httpx.Client) -> None:
    response = control_site.get("/projects", params={"page": 1})

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    parsed = parse_listing(response.content, str(response.url), SourceProfile(), "utf-8")
    assert parsed.skipped == 0
    assert len(parsed.items) == 10
    assert [item.url for item in parsed.items] == [
        str(control_site.base_url.join(f"/projects/{n}")) for n in range(1, 11)
    ]
    assert [item.title for item in parsed.items] == [p.title for p in sample_page(1)]


def test_last_page_serves_and_past_it_is_404(control_site: httpx.Client) -> None:
    assert control_site.get("/projects", params={"page": SAMPLE_PAGES}).status_code == 200
    assert control_site.get("/projects", params={"page": SAMPLE_PAGES + 1}).status_code == 404
    assert control_site.get("/projects", params={"page": 0}).status_code == 404
    assert control_site.get("/projects", params={"page": -3}).status_code == 404


@pytest.mark.parametrize("query", ["", "?page=", "?page=abc", "?page=1.5", "?page=1&page=2"])
def test_bad_page_is_400(control_site: httpx.Client, query: str) -> None:
    assert control_site.get(f"/projects{query}").status_code == 400


def test_unknown_path_is_404(control_site: httpx.Client) -> None:
    assert control_site.get("/elsewhere").status_code == 404


def test_script_serves_503_then_the_page_and_counts_hits(control_site: httpx.Client) -> None:
    script = {
        "page": 2,
        "responses": [
            {"status": 503, "headers": {"Retry-After": "1"}, "body": "busy", "delay": 0.0},
            {"status": 429, "body": "slow down", "delay": 0.05},
        ],
    }
    assert control_site.post("/_control/script", json=script).status_code == 204

    first = control_site.get("/projects", params={"page": 2})
    second = control_site.get("/projects", params={"page": 2})
    third = control_site.get("/projects", params={"page": 2})
    control_site.get("/projects", params={"page": 1})

    assert (first.status_code, first.headers["retry-after"], first.text) == (503, "1", "busy")
    assert (second.status_code, second.text) == (429, "slow down")
    assert third.status_code == 200
    assert third.text == render_listing(sample_page(2))
    assert control_site.get("/_control/hits").json() == {"1": 1, "2": 3}


@pytest.mark.parametrize(
    "script",
    [
        {"page": "2", "responses": []},
        {"page": 2},
        {"page": 2, "responses": [{"status": 99}]},
        {"page": 2, "responses": [{"status": 500, "delay": -1}]},
        {"page": 2, "responses": [{"status": 500, "headers": {"X": 1}}]},
        [],
    ],
)
def test_bad_script_is_400(control_site: httpx.Client, script: object) -> None:
    assert control_site.post("/_control/script", json=script).status_code == 400


def test_put_page_overrides_the_sample_and_any_page_number(control_site: httpx.Client) -> None:
    body = "<p>Привет</p>".encode("windows-1251")
    response = control_site.put(
        "/_control/pages/1",
        content=body,
        headers={"X-Serve-Content-Type": "text/html; charset=windows-1251"},
    )
    assert response.status_code == 204
    assert control_site.put("/_control/pages/500", content=b"far away").status_code == 204

    page_one = control_site.get("/projects", params={"page": 1})
    page_far = control_site.get("/projects", params={"page": 500})

    assert page_one.content == body
    assert page_one.headers["content-type"] == "text/html; charset=windows-1251"
    assert (page_far.status_code, page_far.content) == (200, b"far away")
    assert page_far.headers["content-type"] == "text/html; charset=utf-8"


def test_reset_forgets_pages_scripts_and_hits(control_site: httpx.Client) -> None:
    control_site.put("/_control/pages/1", content=b"replaced")
    control_site.post("/_control/script", json={"page": 1, "responses": [{"status": 500}]})
    control_site.get("/projects", params={"page": 3})

    assert control_site.post("/_control/reset").status_code == 204

    assert control_site.get("/_control/hits").json() == {}
    response = control_site.get("/projects", params={"page": 1})
    assert (response.status_code, response.text) == (200, render_listing(sample_page(1)))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/_control/pages/1"),
        ("POST", "/_control/script"),
        ("GET", "/_control/hits"),
        ("POST", "/_control/reset"),
        ("PUT", "/_control/robots"),
        ("PUT", "/_control/behaviour"),
        ("GET", "/_control/log"),
    ],
)
def test_control_routes_are_404_when_control_is_off(
    plain_site: httpx.Client, method: str, path: str
) -> None:
    assert plain_site.request(method, path, content=b"{}").status_code == 404
    assert plain_site.get("/projects", params={"page": 1}).status_code == 200


# --- politeness: robots.txt, validators, caps, the log -------------------------------------------


def test_robots_txt_is_404_until_set_then_what_was_set(control_site: httpx.Client) -> None:
    assert control_site.get("/robots.txt").status_code == 404
    robots = {"status": 200, "body": "User-agent: *\nDisallow: /x\n"}
    assert control_site.put("/_control/robots", json=robots).status_code == 204
    response = control_site.get("/robots.txt")
    assert (response.status_code, response.text) == (200, robots["body"])
    assert control_site.put("/_control/robots", json={"status": 503}).status_code == 204
    assert control_site.get("/robots.txt").status_code == 503


def test_more_pages_and_a_delay(control_site: httpx.Client) -> None:
    assert control_site.get("/projects", params={"page": 200}).status_code == 404
    behaviour = {"pages": 200, "delay": 0.2}
    assert control_site.put("/_control/behaviour", json=behaviour).status_code == 204
    response = control_site.get("/projects", params={"page": 200})
    assert response.text == render_listing(sample_page(200, pages=200))
    entry = control_site.get("/_control/log").json()[-1]
    assert entry["departure"] - entry["arrival"] >= 0.2


def test_validators_and_304(control_site: httpx.Client) -> None:
    control_site.put("/_control/behaviour", json={"validators": True})
    first = control_site.get("/projects", params={"page": 1})
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
    by_etag = control_site.get("/projects?page=1", headers={"If-None-Match": etag})
    by_date = control_site.get("/projects?page=1", headers={"If-Modified-Since": modified})
    other = control_site.get("/projects?page=1", headers={"If-None-Match": '"other"'})
    assert (by_etag.status_code, by_etag.content, by_etag.headers["ETag"]) == (304, b"", etag)
    assert by_date.status_code == 304
    # If-None-Match decides when present (RFC 9110 13.2.2), whatever If-Modified-Since says.
    assert other.status_code == 200 and other.text == first.text
    control_site.put("/_control/pages/1", content=b"<p>new</p>")
    changed = control_site.get("/projects?page=1", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag


def test_requests_past_the_rate_are_429_with_retry_after(control_site: httpx.Client) -> None:
    behaviour = {"max_requests_per_second": 3, "retry_after": 7}
    control_site.put("/_control/behaviour", json=behaviour)
    answers = [control_site.get("/projects", params={"page": 1}) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert answers[3].headers["Retry-After"] == "7"
    log = control_site.get("/_control/log").json()
    assert [entry["status"] for entry in log] == [200, 200, 200, 429, 429]
    assert all(entry["arrival"] <= entry["departure"] for entry in log)
    assert log[0]["user_agent"].startswith("python-httpx/")


def test_requests_past_the_concurrency_cap_are_429(control_site: httpx.Client) -> None:
    control_site.put("/_control/behaviour", json={"max_concurrency": 2, "delay": 0.5})
    base = str(control_site.base_url)
    statuses: list[int] = []

    def get() -> None:
        with httpx.Client(base_url=base, trust_env=False, timeout=5) as client:
            statuses.append(client.get("/projects", params={"page": 1}).status_code)

    threads = [threading.Thread(target=get) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 200, 429]


@pytest.mark.parametrize(
    "behaviour",
    [{"pages": -1}, {"max_concurrency": 0}, {"validators": "yes"}, {"speed": 1}, [1]],
)
def test_bad_behaviour_is_400(control_site: httpx.Client, behaviour: object) -> None:
    assert control_site.put("/_control/behaviour", json=behaviour).status_code == 400


def test_reset_forgets_robots_behaviour_and_the_log(control_site: httpx.Client) -> None:
    control_site.put("/_control/robots", json={"status": 200, "body": "x"})
    control_site.put("/_control/behaviour", json={"pages": 1})
    control_site.get("/robots.txt")
    assert control_site.post("/_control/reset").status_code == 204
    assert control_site.get("/_control/log").json() == []
    assert control_site.get("/robots.txt").status_code == 404
    assert control_site.get("/projects", params={"page": SAMPLE_PAGES}).status_code == 200


@pytest.fixture
def cli() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `python -m sample_site` with extra arguments; stopped after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "sample_site", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_prints_its_address_and_exits_cleanly_on_signal(
    cli: Callable[..., subprocess.Popen[str]], stop_signal: signal.Signals
) -> None:
    process = cli("--address", "127.0.0.1:0", "--control")
    assert process.stdout is not None
    line = process.stdout.readline()

    match = re.fullmatch(r"sample site listening on (http://127\.0\.0\.1:(\d+))\n", line)
    assert match is not None, line
    assert int(match.group(2)) > 0
    with httpx.Client(base_url=match.group(1), timeout=5.0, trust_env=False) as client:
        assert client.get("/projects?page=1").status_code == 200
        assert client.get("/_control/hits").json() == {"1": 1}

    process.send_signal(stop_signal)
    out, _ = process.communicate(timeout=10)
    assert process.returncode == 0
    assert out == ""

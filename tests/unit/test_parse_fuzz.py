"""Property tests for worker.parse: no input makes it raise, and rendered projects parse back."""

from __future__ import annotations

import datetime
from urllib.parse import urljoin

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.settings import SourceProfile
from sample_site.pages import SampleProject, render_listing
from worker.parse import ParsedPage, ProjectItem, parse_listing

PAGE_URL = "http://127.0.0.1:8081/projects?page=1"
PROFILE = SourceProfile()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text an HTML document can carry: no surrogates (not encodable) and no C0/C1 control characters,
# which HTML forbids in text; whitespace of every kind stays in, it must collapse on both sides.
text = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs", "Cc")),
        st.sampled_from(" \t\n\r\u00a0\u2003\u3000"),
    ),
    max_size=40,
)
hrefs = st.one_of(
    st.integers(min_value=1, max_value=10**9).map(lambda n: f"/projects/{n}"),
    st.from_regex(r"https?://[a-z]{1,12}\.example/[a-z0-9/]{0,12}", fullmatch=True),
)
projects = st.builds(
    SampleProject,
    title=text,
    href=hrefs,
    description=text,
    is_active=st.booleans(),
    start_date=st.none() | st.dates(),
)


def collapse(value: str) -> str:
    return " ".join(value.split())


# Pieces of the listing format glued in random order with random bytes between them reach far
# deeper into the parser than uniform random bytes, which rarely even contain a "<".
markupish = st.lists(
    st.sampled_from(
        [
            b"<",
            b">",
            b"</",
            b'<article class="project is-active">',
            b'<h2 class="project-title">',
            b'<a href="',
            b'">',
            b'<time class="project-start" datetime="',
            b"</a></h2>",
            b"</article>",
            b"&amp;",
            b"&#x",
            b'<meta charset="windows-1251">',
            b"<?xml",
            b"\xef\xbb\xbf",
            b"\xff\xfe",
            b"\x00",
        ]
    )
    | st.binary(max_size=16),
    max_size=60,
).map(b"".join)
encodings = st.sampled_from([None, "utf-8", "windows-1251", "shift_jis", "utf-16", "bogus"])


@FUZZ
@given(st.binary(max_size=4096), encodings)
def test_random_bytes_never_raise(body: bytes, encoding: str | None) -> None:
    parsed = parse_listing(body, PAGE_URL, PROFILE, encoding=encoding)

    assert parsed.skipped >= 0


@FUZZ
@given(markupish, encodings)
def test_random_markup_like_bytes_never_raise(body: bytes, encoding: str | None) -> None:
    parsed = parse_listing(body, PAGE_URL, PROFILE, encoding=encoding)

    for item in parsed.items:
        assert item.title
        assert item.url.startswith(("http://", "https://"))


@FUZZ
@given(st.lists(projects, max_size=5), st.data())
def test_truncated_pages_never_raise(listed: list[SampleProject], data: st.DataObject) -> None:
    body = render_listing(listed).encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(body)), label="cut")

    parsed = parse_listing(body[:cut], PAGE_URL, PROFILE)

    assert len(parsed.items) + parsed.skipped <= len(listed)


@FUZZ
@given(st.lists(projects, max_size=8))
def test_rendered_projects_parse_back_or_are_skipped(listed: list[SampleProject]) -> None:
    parsed = parse_listing(render_listing(listed).encode(), PAGE_URL, PROFILE)

    expected = [project for project in listed if collapse(project.title)]
    assert parsed.skipped == len(listed) - len(expected)
    assert len(parsed.items) + parsed.skipped == len(listed)
    for item, project in zip(parsed.items, expected, strict=True):
        assert item.url == urljoin(PAGE_URL, project.href)
        assert item.title == collapse(project.title)
        assert item.description == collapse(project.description)
        assert item.is_active is project.is_active
        assert item.start_date == project.start_date


def test_rendered_edge_values_round_trip() -> None:
    listed = [
        SampleProject("A & B <c>", "/projects/1", 'x < "y"', True, datetime.date(1, 1, 1)),
        SampleProject(" \u00a0\n", "/projects/2", "title is only whitespace", False, None),
        SampleProject("Ёж 🦔", "https://other.example/p", "", False, datetime.date(9999, 12, 31)),
    ]

    parsed = parse_listing(render_listing(listed).encode(), PAGE_URL, PROFILE)

    assert parsed == ParsedPage(
        [
            ProjectItem(
                "http://127.0.0.1:8081/projects/1",
                "A & B <c>",
                'x < "y"',
                True,
                datetime.date(1, 1, 1),
            ),
            ProjectItem("https://other.example/p", "Ёж 🦔", "", False, datetime.date(9999, 12, 31)),
        ],
        1,
    )

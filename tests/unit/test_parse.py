"""Listing pages parse field by field into exactly the expected items (worker.parse).

Every test runs with each parser (SOURCE_PARSER): both must read these pages alike.
"""

from __future__ import annotations

import datetime
import gc
from typing import get_args

import pytest
from bs4.element import PageElement

from core.settings import SourceParser, SourceProfile
from worker import parse as parse_module
from worker.page_tree import ProfileError
from worker.parse import ParsedPage, ProjectItem

PAGE_URL = "https://example.org/catalog/projects?page=2"
PROFILE = SourceProfile()
PARSER: SourceParser = "beautifulsoup"


@pytest.fixture(autouse=True, params=get_args(SourceParser))
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SourceParser:
    """Each test once per parser: `parse_listing` below reads with it."""
    monkeypatch.setattr(f"{__name__}.PARSER", request.param)
    chosen: SourceParser = request.param
    return chosen


def parse_listing(
    body: bytes, page_url: str, profile: SourceProfile, encoding: str | None = None
) -> ParsedPage:
    return parse_module.parse_listing(body, page_url, profile, encoding, PARSER)


def page(*articles: str, head: str = '<meta charset="utf-8">') -> str:
    body = "\n".join(articles)
    return f"<!DOCTYPE html><html><head>{head}</head><body><main>{body}</main></body></html>"


def article(
    title: str = "Solar roof",
    href: str | None = "/projects/1",
    *,
    css_class: str = "project",
    description: str | None = None,
    start: str | None = None,
) -> str:
    link = f'<a href="{href}">{title}</a>' if href is not None else title
    parts = [f'<article class="{css_class}">', f'<h2 class="project-title">{link}</h2>']
    if description is not None:
        parts.append(f'<p class="project-description">{description}</p>')
    if start is not None:
        parts.append(start)
    parts.append("</article>")
    return "".join(parts)


def parse(html: str) -> ParsedPage:
    return parse_listing(html.encode(), PAGE_URL, PROFILE)


def only_item(html: str) -> ProjectItem:
    parsed = parse(html)
    assert parsed.skipped == 0
    assert len(parsed.items) == 1
    return parsed.items[0]


def test_all_fields_of_one_item() -> None:
    html = page(
        article(
            "Solar roof",
            "/projects/1",
            css_class="project is-active",
            description="Panels on the school roof.",
            start='<time class="project-start" datetime="2024-03-05">05.03.2024</time>',
        )
    )

    assert parse(html) == ParsedPage(
        [
            ProjectItem(
                url="https://example.org/projects/1",
                title="Solar roof",
                description="Panels on the school roof.",
                is_active=True,
                start_date=datetime.date(2024, 3, 5),
            )
        ],
        0,
    )


def test_entities_become_text() -> None:
    item = only_item(
        page(
            article("Fish &amp; Chips &quot;Deluxe&quot; &#x1F600;", description="a &lt; b &#169;")
        )
    )

    assert item.title == 'Fish & Chips "Deluxe" 😀'
    assert item.description == "a < b ©"


def test_cyrillic_and_emoji_survive_utf8() -> None:
    item = only_item(page(article("Городской сад 🌻", description="Чистая река — 2024")))

    assert item.title == "Городской сад 🌻"
    assert item.description == "Чистая река — 2024"


def test_whitespace_collapses_including_nbsp() -> None:
    item = only_item(
        page(article("\n   Bike\t\tlanes&nbsp;&nbsp;now \n", description="  one\u00a0\n two  "))
    )

    assert item.title == "Bike lanes now"
    assert item.description == "one two"


def test_title_text_spans_nested_inline_elements() -> None:
    item = only_item(page(article("Open <b>data</b> <i>portal</i>")))

    assert item.title == "Open data portal"


@pytest.mark.parametrize(
    ("href", "url"),
    [
        ("/projects/7", "https://example.org/projects/7"),
        ("7", "https://example.org/catalog/7"),
        ("../about/7?x=1#top", "https://example.org/about/7?x=1#top"),
        ("//cdn.example.net/p/7", "https://cdn.example.net/p/7"),
        ("http://other.example.com/p/7", "http://other.example.com/p/7"),
        ("  https://other.example.com/p/7\n ", "https://other.example.com/p/7"),
        ("HTTPS://Other.Example.com/p/7", "https://Other.Example.com/p/7"),
        ("?page=3", "https://example.org/catalog/projects?page=3"),
    ],
)
def test_links_resolve_against_the_page_url(href: str, url: str) -> None:
    assert only_item(page(article(href=href))).url == url


@pytest.mark.parametrize(
    "href",
    [
        "",
        "   ",
        "javascript:void(0)",
        "mailto:team@example.org",
        "data:text/html,hi",
        "ftp://example.org/p/7",
        "http://[::1",
    ],
)
def test_unusable_links_skip_the_item(href: str) -> None:
    assert parse(page(article(href=href))) == ParsedPage([], 1)


def test_link_without_href_skips_the_item() -> None:
    html = page('<article class="project"><h2 class="project-title"><a>No href</a></h2></article>')

    assert parse(html) == ParsedPage([], 1)


def test_missing_title_or_link_is_skipped_and_counted() -> None:
    html = page(
        article("Kept", "/projects/1"),
        article("No link", None),
        '<article class="project"><a href="/projects/3">no title element</a></article>',
        article("   ", "/projects/4"),
        article("Also kept", "/projects/5"),
    )

    parsed = parse(html)

    assert [item.title for item in parsed.items] == ["Kept", "Also kept"]
    assert [item.url for item in parsed.items] == [
        "https://example.org/projects/1",
        "https://example.org/projects/5",
    ]
    assert parsed.skipped == 3


def test_missing_description_is_empty() -> None:
    assert only_item(page(article(description=None))).description == ""


@pytest.mark.parametrize(
    ("css_class", "active"),
    [
        ("project is-active", True),
        ("is-active   project highlighted", True),
        ("project", False),
        ("project is-active-soon", False),
        ("project IS-ACTIVE", False),
        ("\tproject\nis-active\r\n", True),
        # HTML separates class names with ASCII whitespace only: one class, as in a browser.
        ("project is-active\u00a0new", False),
    ],
)
def test_active_class(css_class: str, active: bool) -> None:
    assert only_item(page(article(css_class=css_class))).is_active is active


def test_an_item_class_joined_by_a_no_break_space_is_no_item_as_in_a_browser() -> None:
    # `.project` does not match class="project&nbsp;is-active" in CSS: it is one class name.
    assert parse(page(article(css_class="project\u00a0is-active"))) == ParsedPage([], 0)


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        ('<time class="project-start" datetime="2024-03-05">whenever</time>', (2024, 3, 5)),
        ('<time class="project-start" datetime=" 2024-03-05 "></time>', (2024, 3, 5)),
        ('<time class="project-start" datetime="2024-03-05T23:30:00+02:00"></time>', (2024, 3, 5)),
        ('<time class="project-start" datetime="2024-03-05T10:00:00Z"></time>', (2024, 3, 5)),
        ('<time class="project-start" datetime="2024-03-05 10:00"></time>', (2024, 3, 5)),
        ('<time class="project-start">05.03.2024</time>', (2024, 3, 5)),
        ('<time class="project-start">\n  29.02.2024 \n</time>', (2024, 2, 29)),
        # An unreadable machine value falls back to the human-readable text.
        ('<time class="project-start" datetime="soon">05.03.2024</time>', (2024, 3, 5)),
        ('<time class="project-start" datetime="2024-13-01">05.03.2024</time>', (2024, 3, 5)),
    ],
)
def test_start_date_forms(start: str, expected: tuple[int, int, int]) -> None:
    assert only_item(page(article(start=start))).start_date == datetime.date(*expected)


@pytest.mark.parametrize(
    "start",
    [
        None,
        '<time class="project-start"></time>',
        '<time class="project-start">31.02.2024</time>',
        '<time class="project-start">29.02.2023</time>',
        '<time class="project-start" datetime="2024-13-01"></time>',
        '<time class="project-start" datetime="2024-02-30T10:00"></time>',
        '<time class="project-start" datetime="2024-02-31">31.02.2024</time>',
        '<time class="project-start">2024-03-05</time>',
        '<time class="project-start">next spring</time>',
        # The profile selects time.project-start: a span with the class is not it.
        '<span class="project-start">05.03.2024</span>',
    ],
)
def test_start_date_absent_or_impossible_is_none(start: str | None) -> None:
    assert only_item(page(article(start=start))).start_date is None


def test_duplicated_item_appears_twice_in_page_order() -> None:
    html = page(article("A", "/a"), article("B", "/b"), article("A", "/a"))

    assert [item.title for item in parse(html).items] == ["A", "B", "A"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   \n",
        b"<!DOCTYPE html><html><head></head><body></body></html>",
        b"<html><body><div class='projects'>nothing</div></body></html>",
        b"plain text, no markup",
        b"projects.html",
        b"https://example.org/projects",
        b'<?xml version="1.0"?><feed><entry>x</entry></feed>',
    ],
)
def test_page_without_items_is_empty(body: bytes) -> None:
    assert parse_listing(body, PAGE_URL, PROFILE) == ParsedPage([], 0)


CYRILLIC_ARTICLE = article("Чистая река", "/projects/9", description="Уборка пляжа")


def test_windows_1251_declared_by_meta_charset_only() -> None:
    body = page(CYRILLIC_ARTICLE, head='<meta charset="windows-1251">').encode("windows-1251")

    item = parse_listing(body, PAGE_URL, PROFILE).items[0]

    assert (item.title, item.description) == ("Чистая река", "Уборка пляжа")


def test_windows_1251_declared_by_http_equiv_meta() -> None:
    head = '<meta http-equiv="Content-Type" content="text/html; charset=windows-1251">'
    body = page(CYRILLIC_ARTICLE, head=head).encode("windows-1251")

    assert parse_listing(body, PAGE_URL, PROFILE).items[0].title == "Чистая река"


def test_windows_1251_declared_by_the_encoding_argument() -> None:
    body = page(CYRILLIC_ARTICLE, head="").encode("windows-1251")

    item = parse_listing(body, PAGE_URL, PROFILE, encoding="windows-1251").items[0]

    assert (item.title, item.description) == ("Чистая река", "Уборка пляжа")


def test_encoding_argument_wins_over_a_contradicting_meta() -> None:
    # HTTP's charset outranks the document's own claim (as in the HTML spec).
    body = page(CYRILLIC_ARTICLE, head='<meta charset="utf-8">').encode("windows-1251")

    item = parse_listing(body, PAGE_URL, PROFILE, encoding="windows-1251").items[0]

    assert item.title == "Чистая река"


def test_shift_jis_declared_by_meta_charset_only() -> None:
    html = page(
        article("日本語のプロジェクト", "/p/1", description="説明です"),
        head='<meta charset="Shift_JIS">',
    )

    item = parse_listing(html.encode("shift_jis"), PAGE_URL, PROFILE).items[0]

    assert (item.title, item.description) == ("日本語のプロジェクト", "説明です")


@pytest.mark.parametrize("encoding", ["no-such-charset", "utf-9", "", "x" * 300])
def test_bogus_encoding_argument_falls_back_to_detection(encoding: str) -> None:
    body = page(CYRILLIC_ARTICLE, head='<meta charset="windows-1251">').encode("windows-1251")

    assert parse_listing(body, PAGE_URL, PROFILE, encoding=encoding).items[0].title == (
        "Чистая река"
    )


def test_utf8_without_any_declaration() -> None:
    body = page(CYRILLIC_ARTICLE, head="").encode()

    assert parse_listing(body, PAGE_URL, PROFILE).items[0].title == "Чистая река"


def test_xml_prolog_before_html() -> None:
    body = (
        '<?xml version="1.0" encoding="windows-1251"?>\n'
        '<html xmlns="http://www.w3.org/1999/xhtml"><body>'
        f"{CYRILLIC_ARTICLE}</body></html>"
    ).encode("windows-1251")

    assert parse_listing(body, PAGE_URL, PROFILE).items[0].title == "Чистая река"


def test_malformed_html_parses_as_far_as_it_can() -> None:
    html = (
        "<html><body><main>"
        '<article class="project is-active"><h2 class="project-title">'
        '<a href="/p/1">Unclosed heading</a>'
        '<p class="project-description">Text without end'
        "</div></div>"
        '<article class="project"><h2 class="project-title"><a href="/p/2">Second</a></h2>'
        '<time class="project-start" datetime="2024-01-02">'
    )

    parsed = parse(html)

    assert [(item.title, item.url, item.is_active) for item in parsed.items] == [
        ("Unclosed heading", "https://example.org/p/1", True),
        ("Second", "https://example.org/p/2", False),
    ]
    assert parsed.items[1].start_date == datetime.date(2024, 1, 2)
    assert parsed.skipped == 0


def test_stray_closing_tags_are_ignored() -> None:
    html = page("</div></span></article>", article("Still here", "/p/1"), "</div></p>")

    assert [item.title for item in parse(html).items] == ["Still here"]


def test_custom_profile_with_other_selectors() -> None:
    profile = SourceProfile(
        item="li.job",
        active_class="open",
        title="h3.name",
        link="a.more",
        description="div.summary",
        start="span.when",
        start_text_format="%Y/%m/%d",
    )
    html = """
        <ul>
          <li class="job open"><h3 class="name">Data &amp; Maps</h3>
            <div class="summary">Map the parks.</div>
            <span class="when">2025/01/31</span>
            <a class="more" href="jobs/1">more</a></li>
          <li class="job"><h3 class="name">Closed one</h3>
            <a class="more" href="https://jobs.example.net/2">more</a></li>
          <li class="job"><h3 class="name">No link here</h3></li>
          <li class="project"><h3 class="name">Not a job</h3><a class="more" href="/x">x</a></li>
        </ul>
    """

    parsed = parse_listing(html.encode(), "https://example.org/board/", profile)

    assert parsed == ParsedPage(
        [
            ProjectItem(
                url="https://example.org/board/jobs/1",
                title="Data & Maps",
                description="Map the parks.",
                is_active=True,
                start_date=datetime.date(2025, 1, 31),
            ),
            ProjectItem(
                url="https://jobs.example.net/2",
                title="Closed one",
                description="",
                is_active=False,
                start_date=None,
            ),
        ],
        1,
    )


@pytest.mark.parametrize("body", [b"", b"<p>some page</p>"])
def test_invalid_selector_in_the_profile_raises_on_every_page(body: bytes) -> None:
    # A broken profile is configuration to fix, not a page to skip.
    expected = ProfileError if PARSER == "lxml" else Exception
    with pytest.raises(expected, match=r"Malformed attribute selector|Expected"):
        parse_listing(body, PAGE_URL, SourceProfile(title="h2["))


def test_the_parsed_tree_is_freed_without_the_cycle_collector() -> None:
    # A worker parses many pages at once; trees left to the cycle collector cost it a fifth of
    # its CPU in full collections, so parse_listing takes its tree apart before returning.
    def elements_alive() -> int:
        return sum(isinstance(thing, PageElement) for thing in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = elements_alive()
        parsed = parse(page(*(article(f"Project {n}", f"/p/{n}") for n in range(20))))
        assert len(parsed.items) == 20
        # Only the document object and one string it holds wait for the collector, whatever
        # the page's size (the tree of these 20 items alone is over 100 elements); lxml's
        # tree, freed by reference counting, leaves none.
        assert elements_alive() - before <= (2 if PARSER == "beautifulsoup" else 0)
    finally:
        gc.enable()

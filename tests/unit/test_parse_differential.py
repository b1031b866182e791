"""Both parsers (SOURCE_PARSER) read every page alike: identical `ParsedPage`s.

BeautifulSoup (worker/soup_tree.py) is the reference and lxml (worker/lxml_tree.py) is held
to it on generated documents (hypothesis), on the parser fuzz corpus of test_parse_fuzz.py,
on every sample-site page, and on truncated and mis-encoded bodies, under the default profile
and under profiles that use each selector feature the lxml path takes. The cases where
libxml2's tree and bs4's reading of it differ, and which lxml_tree.py makes agree, each have a
test of their own below.
"""

from __future__ import annotations

import codecs
import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import data
from core.settings import SourceProfile
from sample_site.pages import SAMPLE_PAGES, SampleProject, render_listing, sample_page
from tests.support.services import in_ci
from tests.unit.test_parse_fuzz import encodings, markupish, projects
from worker.page_tree import ProfileError
from worker.parse import ParsedPage, check_profile, parse_listing

PAGE_URL = "https://example.org/catalog/projects?page=2"
# Budget: a few seconds a test; in CI the same examples every run.
DIFFERENTIAL = settings(
    max_examples=200,
    deadline=None,
    derandomize=in_ci(),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The default profile, and profiles that use every selector feature lxml_tree.py accepts.
PROFILES = [
    SourceProfile(),
    SourceProfile(
        item="li.job:not(.closed), div.card",
        active_class="open",
        title="h3, .name",
        link="a[href^='http'], a.more",
        description="div.summary > p, span.summary",
        start="time[datetime], span.when",
        start_text_format="%Y/%m/%d",
    ),
    SourceProfile(
        item="ul > li:nth-child(2n+1), section article:first-of-type",
        title="b:first-child, i:last-child",
        link="a[rel~=next], a:only-child",
        description="p ~ span, p + em, span:nth-last-of-type(1)",
        start="[data-day], time:only-of-type",
    ),
    SourceProfile(
        item="[class|=item], [id$=x], *[class*=proj]",
        title="[title], h2 a",
        link="a:not([href*=skip]), a:nth-of-type(2)",
        description="p:last-of-type, div:nth-last-child(1)",
        start="time, :first-child > span",
    ),
]


def both(body: bytes, profile: SourceProfile, encoding: str | None = None) -> ParsedPage:
    """The page as BeautifulSoup reads it, asserted to be how lxml reads it too."""
    expected = parse_listing(body, PAGE_URL, profile, encoding, "beautifulsoup")
    assert parse_listing(body, PAGE_URL, profile, encoding, "lxml") == expected
    return expected


# --- generated documents ---

TAGS = [
    "article", "div", "section", "ul", "li", "h2", "h3", "a", "p", "span", "b", "i", "em",
    "time", "main", "table", "tr", "td", "form", "select", "option", "textarea", "pre", "br",
    "img", "noscript", "title", "ruby", "script", "style", "template", "rt", "rp", "svg",
    "head", "body", "html", "button", "label", "iframe", "xmp", "plaintext", "nobr",
]  # fmt: skip
CLASS_WORDS = [
    "project", "is-active", "project-title", "project-description", "project-start", "job",
    "open", "closed", "card", "name", "summary", "more", "when", "item-1", "proj", "x",
]  # fmt: skip
# Class separators: ASCII whitespace (form feed included), and others that are no separator.
SEPARATORS = [" ", "  ", "\t", "\n", "\r\n", "\f", "\u00a0", "\u2003", ""]
ATTRIBUTES = ["class", "href", "datetime", "id", "rel", "title", "data-day", "type", "CLASS"]
ATTRIBUTE_VALUES = [
    "/projects/1", "7", "../up/7?x=1#t", "//cdn.example.net/p", "http://o.example/p",
    " https://o.example/q\n", "javascript:void(0)", "mailto:a@b", "", "   ", "http://[::1",
    "2024-03-05", " 2024-03-05T10:00:00+02:00 ", "2024-13-01", "soon", "next", "skip-me",
    "a &amp; b", "&quot;q&quot;", "\u00a0", "\f", "x\ty", "ÄÖ&#x1F600;",
]  # fmt: skip
TEXTS = st.one_of(
    st.text(
        alphabet=st.one_of(
            st.characters(codec="utf-8", max_codepoint=0x2FFF),
            st.sampled_from(" \t\n\r\f\u00a0\u2003\u3000<>&;/="),
        ),
        max_size=12,
    ),
    st.sampled_from(
        [
            "05.03.2024", "2025/01/31", " 29.02.2024 ", "&amp;", "&nbsp;", "&#x1F600;",
            "&bogus;", "&lt", "&#0;", "&#xD800;", "Чистая река", "日本語", "  \n ", "\x00",
            "<!-- c -->", "<!--", "<![CDATA[cd]]>", "<?php x ?>", "</p>", "</div></span>",
            "<br/>", "<p>", "<a href=/x>", "<time datetime=2024-01-02>",
        ]
    ),
)  # fmt: skip


@st.composite
def attributes(draw: st.DrawFn) -> str:
    rendered = []
    for name in draw(st.lists(st.sampled_from(ATTRIBUTES), max_size=4)):
        if name.lower() == "class":
            words = draw(st.lists(st.sampled_from(CLASS_WORDS), max_size=4))
            value = "".join(draw(st.sampled_from(SEPARATORS)) + word for word in words) + draw(
                st.sampled_from(SEPARATORS)
            )
        else:
            value = draw(st.sampled_from(ATTRIBUTE_VALUES))
        quote = draw(st.sampled_from(['"', "'", ""]))
        if (not quote and any(c in value for c in " \t\n\r\f\"'=<>`")) or not value:
            quote = '"'
        rendered.append(f" {name}={quote}{value}{quote}")
    return "".join(rendered)


def element(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    @st.composite
    def build(draw: st.DrawFn) -> str:
        tag = draw(st.sampled_from(TAGS))
        inner = "".join(draw(st.lists(children, max_size=4)))
        closing = draw(st.sampled_from([f"</{tag}>", f"</{tag}>", f"</{tag}>", ""]))
        return f"<{tag}{draw(attributes())}>{inner}{closing}"

    return build()


fragments = st.recursive(TEXTS, element, max_leaves=30)
HEADS = [
    "",
    '<meta charset="utf-8">',
    '<meta charset="windows-1251">',
    '<meta http-equiv="Content-Type" content="text/html; charset=shift_jis">',
    '<meta charset="no-such-charset">',
    "<title>t</title><style>.project { }</style>",
]
DOCTYPES = ["", "<!DOCTYPE html>", '<?xml version="1.0" encoding="windows-1251"?>']


@st.composite
def documents(draw: st.DrawFn) -> str:
    body = "".join(draw(st.lists(fragments, max_size=6)))
    head = draw(st.sampled_from(HEADS))
    shape = draw(st.sampled_from(["full", "bare", "body only"]))
    if shape == "bare":
        return body
    doctype = draw(st.sampled_from(DOCTYPES))
    if shape == "body only":
        return f"{doctype}{head}{body}"
    return f"{doctype}<html><head>{head}</head><body>{body}</body></html>"


# What a page's bytes may be, for a charset that may not hold its characters.
BODY_CODECS = ["utf-8", "utf-8-sig", "windows-1251", "shift_jis", "utf-16", "utf-16-le", "latin-1"]


@DIFFERENTIAL
@given(
    documents(),
    st.sampled_from(BODY_CODECS),
    encodings,
    st.sampled_from(range(len(PROFILES))),
)
def test_generated_documents_read_alike(
    html: str, codec: str, encoding: str | None, profile: int
) -> None:
    both(html.encode(codec, errors="replace"), PROFILES[profile], encoding)


@DIFFERENTIAL
@given(documents(), st.data())
def test_truncated_generated_documents_read_alike(html: str, cut: st.DataObject) -> None:
    body = html.encode()
    at = cut.draw(st.integers(min_value=0, max_value=len(body)), label="cut")
    both(body[:at], PROFILES[0])
    both(body[:at], PROFILES[1])


# --- the fuzz corpus of test_parse_fuzz.py ---


@DIFFERENTIAL
@given(st.binary(max_size=4096), encodings)
def test_random_bytes_read_alike(body: bytes, encoding: str | None) -> None:
    both(body, PROFILES[0], encoding)


@DIFFERENTIAL
@given(markupish, encodings)
def test_markup_like_bytes_read_alike(body: bytes, encoding: str | None) -> None:
    both(body, PROFILES[0], encoding)


@DIFFERENTIAL
@given(st.lists(projects, max_size=8), st.data())
def test_rendered_and_truncated_listings_read_alike(
    listed: list[SampleProject], cut: st.DataObject
) -> None:
    body = render_listing(listed).encode()
    parsed = both(body, PROFILES[0])
    assert len(parsed.items) + parsed.skipped == len(listed)
    at = cut.draw(st.integers(min_value=0, max_value=len(body)), label="cut")
    both(body[:at], PROFILES[0])


# --- the sample site's pages and the bench's, whole, cut and mis-encoded ---

SAMPLE_BODIES = [render_listing(sample_page(page)).encode() for page in range(1, SAMPLE_PAGES + 1)]


@pytest.mark.parametrize("page", range(1, SAMPLE_PAGES + 1))
def test_every_sample_page_reads_alike(page: int) -> None:
    parsed = both(SAMPLE_BODIES[page - 1], PROFILES[0], "utf-8")

    assert [item.title for item in parsed.items] == [p.title for p in sample_page(page)]


def test_the_bench_page_of_1000_items_reads_alike() -> None:
    assert len(both(data.listing(1, 1000), data.PROFILE).items) == 1000


@pytest.mark.parametrize("page", [1, 7, SAMPLE_PAGES])
def test_sample_pages_cut_anywhere_read_alike(page: int) -> None:
    body = SAMPLE_BODIES[page - 1]
    for at in range(0, len(body), 97):
        both(body[:at], PROFILES[0])


@pytest.mark.parametrize(
    ("codec", "declared"),
    [
        ("windows-1251", "utf-8"),
        ("windows-1251", None),
        ("utf-8", "shift_jis"),
        ("utf-8", "windows-1252"),
        ("shift_jis", "utf-8"),
        ("utf-16", None),
        ("utf-16-le", None),
        ("utf-16-be", "utf-16"),
        ("utf-32", None),
        ("latin-1", "utf-8"),
        ("cp500", None),
        ("utf-8", "no-such-charset"),
    ],
)
def test_mis_encoded_sample_pages_read_alike(codec: str, declared: str | None) -> None:
    # A page whose bytes are not in the charset the header, its <meta> or nothing claims.
    for page in (2, 5, 11):
        body = render_listing(sample_page(page)).encode(codec, errors="replace")
        both(body, PROFILES[0], declared)
        both(body[: len(body) // 2], PROFILES[0], declared)


def test_invalid_utf8_in_a_utf8_page_reads_alike() -> None:
    body = SAMPLE_BODIES[0].replace(b"River", b"Ri\xff\xfe\xc3ver", 1)
    both(body, PROFILES[0], "utf-8")
    both(body, PROFILES[0])


# --- where the trees or their readings differ, and lxml_tree.py makes them agree ---


def page(article: str, head: str = '<meta charset="utf-8">') -> bytes:
    return f"<!DOCTYPE html><html><head>{head}</head><body>{article}</body></html>".encode()


def test_script_style_and_template_strings_are_no_text() -> None:
    # bs4 gives the strings inside these elements classes of their own, and get_text() of an
    # element leaves them out; lxml's itertext() would keep them.
    parsed = both(
        page(
            '<article class="project"><h2 class="project-title"><a href="/1">Solar'
            "<script>var x = 1;</script><style>b { }</style><template>tpl</template>"
            "<ruby>roof<rp>(</rp><rt>ru:fu</rt><rp>)</rp></ruby> now</a></h2></article>"
        ),
        PROFILES[0],
    )

    assert [item.title for item in parsed.items] == ["Solarroof now"]


def test_an_element_inside_a_template_has_no_text_and_a_template_its_own() -> None:
    profile = SourceProfile(item="div", title="template, h2", link="a")
    parsed = both(
        page(
            '<div><template>In <b>template</b></template><a href="/1">l</a></div>'
            '<div><h2><template><i>hidden</i></template></h2><a href="/2">l</a></div>'
        ),
        profile,
    )

    assert [item.title for item in parsed.items] == ["In template"]
    assert parsed.skipped == 1


def test_comments_and_processing_instructions_are_no_text() -> None:
    parsed = both(
        page(
            '<article class="project"><h2 class="project-title"><a href="/1">'
            "A<!-- not this -->B<?php echo 1; ?>C</a></h2></article>"
        ),
        PROFILES[0],
    )

    assert [item.title for item in parsed.items] == ["ABC"]


@pytest.mark.parametrize("separator", ["\f", "\t", "\r\n", " \f "])
def test_classes_split_on_every_ascii_whitespace_form_feed_included(separator: str) -> None:
    # soupsieve splits class lists on ASCII whitespace; XPath's normalize-space() does not know
    # the form feed, so lxml_tree.py translates it first.
    parsed = both(
        page(
            f'<article class="project{separator}is-active"><h2 class="x{separator}project-title">'
            '<a href="/1">T</a></h2></article>'
        ),
        PROFILES[0],
    )

    assert [(item.title, item.is_active) for item in parsed.items] == [("T", True)]


def test_a_no_break_space_joins_class_names_in_both() -> None:
    assert both(
        page('<article class="project\u00a0x"><h2 class="project-title"><a href="/1">T</a></h2>'),
        PROFILES[0],
    ) == ParsedPage([], 0)


def test_a_field_is_looked_for_inside_the_item_not_in_the_item_itself() -> None:
    # select_one looks at descendants only; cssselect's default prefix includes the element.
    profile = SourceProfile(item=".project-title", title=".project-title", link="a")
    parsed = both(
        page('<h2 class="project-title"><a href="/1"><span class="project-title">In</span></a>'),
        profile,
    )

    assert [item.title for item in parsed.items] == ["In"]


def test_a_field_selector_matches_against_the_whole_page_not_only_the_item() -> None:
    # soupsieve: `.project-title a` inside an item that is itself the .project-title.
    profile = SourceProfile(item="h2.project-title", title="a", link=".project-title a")
    parsed = both(page('<h2 class="project-title"><a href="/1">T</a></h2>'), profile)

    assert [item.url for item in parsed.items] == ["https://example.org/1"]


def test_a_templates_content_is_no_part_of_the_page() -> None:
    # soupsieve neither selects inside a template nor lets a combinator cross one.
    article = '<article class="project"><h2 class="project-title"><a href="/{n}">T{n}</a></h2>'
    parsed = both(
        page(
            f"<template>{article.format(n=1)}</article></template>{article.format(n=2)}"
            f"<template>x</template></article>"
        ),
        PROFILES[0],
    )
    assert [item.title for item in parsed.items] == ["T2"]

    # A template item's fields are matched inside it, not across a template in it, and its
    # strings are all template strings: a title is a template's text or none.
    profile = SourceProfile(item="template", title="template", link="template a, i a")
    parsed = both(
        page(
            '<template><template>one</template><i><a href="/1">x</a></i></template>'
            '<template><template>two</template><a href="/2">x</a></template>'
            "<template><template><template>three</template></template>"
            '<i><a href="/3">x</a></i></template>'
        ),
        profile,
    )
    assert [(item.title, item.url) for item in parsed.items] == [
        ("one", "https://example.org/1"),
        ("three", "https://example.org/3"),
    ]
    assert parsed.skipped == 1


def test_the_encodings_are_tried_in_bs4s_order() -> None:
    # The HTTP charset first, then a BOM, the <meta>, detection, utf-8, windows-1252: a header
    # naming a charset lxml does not know moves on to the <meta>.
    body = page(
        '<article class="project"><h2 class="project-title"><a href="/1">Чистая река</a></h2>',
        head='<meta charset="windows-1251">',
    ).replace(b"utf-8", b"")
    cyrillic = page(
        '<article class="project"><h2 class="project-title"><a href="/1">Чистая река</a></h2>',
        head='<meta charset="windows-1251">',
    )
    encoded = cyrillic.decode().encode("windows-1251")
    for declared in (None, "bogus", "windows-1251", "koi8-r"):
        both(encoded, PROFILES[0], declared)
    assert both(encoded, PROFILES[0], "bogus").items[0].title == "Чистая река"
    assert both(codecs.BOM_UTF8 + body, PROFILES[0], None).items[0].title == "Чистая река"


def test_dates_and_links_read_alike() -> None:
    parsed = both(
        page(
            '<article class="project"><h2 class="project-title"><a href=" ../7 ">T</a></h2>'
            '<time class="project-start" datetime="soon">05.03.2024</time></article>'
        ),
        PROFILES[0],
    )

    assert parsed.items[0].url == "https://example.org/7"
    assert parsed.items[0].start_date == datetime.date(2024, 3, 5)


# --- the selectors the lxml path takes, and those it refuses at worker start ---


@pytest.mark.parametrize("profile", PROFILES)
def test_the_profiles_here_are_taken_by_both_parsers(profile: SourceProfile) -> None:
    check_profile(profile, "beautifulsoup")
    check_profile(profile, "lxml")


@pytest.mark.parametrize(
    ("field", "selector", "reason"),
    [
        ("title", "h2[", "cssselect cannot translate it to XPath"),
        ("title", "h2::before", "Pseudo-elements are not supported"),
        ("item", "li:hover", ":hover may match otherwise"),
        ("link", "a:contains('x')", ":contains() may match otherwise"),
        ("start", "input[type=date]", "may match otherwise than with BeautifulSoup"),
        ("description", "p:empty", ":empty may match otherwise"),
        ("description", "svg|p", "namespace"),
    ],
)
def test_a_selector_lxml_cannot_read_alike_is_refused_with_its_name(
    field: str, selector: str, reason: str
) -> None:
    profile = SourceProfile.model_validate({field: selector})

    with pytest.raises(ProfileError) as refused:
        check_profile(profile, "lxml")

    message = str(refused.value)
    assert message.startswith(
        f"SOURCE_PROFILE__{field.upper()}={selector!r} cannot be used with SOURCE_PARSER=lxml: "
    )
    assert reason in message
    assert message.endswith("or set SOURCE_PARSER=beautifulsoup")


def test_a_selector_soupsieve_cannot_read_is_refused_for_beautifulsoup() -> None:
    with pytest.raises(ProfileError, match=r"SOURCE_PROFILE__TITLE='h2\[' is no CSS selector"):
        check_profile(SourceProfile(title="h2["), "beautifulsoup")

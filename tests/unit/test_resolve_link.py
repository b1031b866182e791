"""resolve_link gives what urljoin gives, its shortcut for plain root paths included.

The rule (worker.parse): `href`, stripped, joined to the page's URL by urljoin, kept when the
result is an http(s) URL with a host. The reference below is that rule written out; links
from the site's root take a shortcut that must not change a single result.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from worker.parse import resolve_link

PAGE_URLS = [
    "https://example.org/catalog/projects?page=2",
    "http://127.0.0.1:8080/listing/3",
    "HTTPS://User:pw@Example.ORG:443",
    "https://example.org/a/b/;p?q#f",
    "http://[::1]:8000/p",
    "http://[::1/p",  # an invalid host: no link resolves against it
    "ftp://example.org/listing",  # not a web page: no link is a project link
    "file:///tmp/listing.html",
]

# The characters that matter to urljoin (separators, dots, escapes, whitespace, controls,
# a non-ASCII letter) and a few plain ones.
HREF_CHARS = st.sampled_from(list("/.;?#:%@[]\\ \t\n\x00aZ7-_~!$&'()*+,=é"))


def by_urljoin(href: str, page_url: str) -> str | None:
    href = href.strip()
    if not href:
        return None
    try:
        url = urljoin(page_url, href)
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme in ("http", "https") and parts.netloc else None


@settings(max_examples=3000, deadline=None)
@given(
    href=st.one_of(
        st.text(HREF_CHARS, max_size=12),
        st.text(HREF_CHARS, max_size=12).map(lambda rest: "/" + rest),
    ),
    page_url=st.sampled_from(PAGE_URLS),
)
@example(href="/projects/7", page_url=PAGE_URLS[0])
@example(href="/a/../b", page_url=PAGE_URLS[0])
@example(href="/a/.", page_url=PAGE_URLS[0])
@example(href="/a?", page_url=PAGE_URLS[0])
@example(href="/a#", page_url=PAGE_URLS[0])
@example(href="/a;", page_url=PAGE_URLS[0])
@example(href="//host/p", page_url=PAGE_URLS[0])
@example(href="/p", page_url="http://[::1/p")
def test_every_link_resolves_as_urljoin_resolves_it(href: str, page_url: str) -> None:
    assert resolve_link(href, page_url) == by_urljoin(href, page_url)


@pytest.mark.parametrize(
    ("href", "page_url", "url"),
    [
        ("/projects/7", "https://example.org/catalog?page=2", "https://example.org/projects/7"),
        ("/p/7", "HTTP://Example.org:8080/x", "http://Example.org:8080/p/7"),
        ("/p/7", "http://[::1/p", None),
        ("/p/7", "ftp://example.org/", None),
    ],
)
def test_root_paths_take_the_page_origin(href: str, page_url: str, url: str | None) -> None:
    assert resolve_link(href, page_url) == url

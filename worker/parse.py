"""Turn one listing page into project items, by the CSS selectors of a `SourceProfile`.

Pure: bytes in, values out, no I/O. A page from the wild may be malformed, truncated, in any
charset or not HTML at all, so `parse_listing` never raises on content: what it cannot read it
skips (and counts) or leaves empty. Only a broken profile (an invalid CSS selector) raises,
because that is a configuration error to fail on, not a page to shrug at.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from bs4 import BeautifulSoup, ParserRejectedMarkup, Tag

from core.settings import SourceProfile

_WEB_SCHEMES = frozenset({"http", "https"})
# A class attribute is a list of names separated by ASCII whitespace (HTML's "set of
# space-separated tokens"); the pattern soupsieve uses for the same.
_CLASS_NAME = re.compile(r"[^ \t\r\n\f]+")


@dataclass(frozen=True, slots=True)
class ProjectItem:
    """One project as the listing shows it."""

    url: str
    title: str
    description: str
    is_active: bool
    start_date: datetime.date | None


@dataclass(frozen=True, slots=True)
class ParsedPage:
    """The valid items of a page in page order, and how many items were unusable."""

    items: list[ProjectItem]
    skipped: int


def parse_listing(
    body: bytes, page_url: str, profile: SourceProfile, encoding: str | None = None
) -> ParsedPage:
    """Parse a listing page; `encoding` is the charset of the HTTP Content-Type, if it had one.

    Items without a title or a usable http(s) link are skipped and counted; a page with no
    items, or one the parser rejects outright, is `ParsedPage([], 0)`. Raises only for an
    invalid CSS selector in `profile` (soupsieve's SelectorSyntaxError).
    """
    soup = _soup(body, encoding)
    try:
        fields = _Fields.compile(soup, page_url, profile)
        items: list[ProjectItem] = []
        skipped = 0
        for element in soup.select(profile.item):
            item = fields.item(element)
            if item is None:
                skipped += 1
            else:
                items.append(item)
        return ParsedPage(items, skipped)
    finally:
        _free(soup)


def _soup(body: bytes, encoding: str | None) -> BeautifulSoup:
    """The parsed page; an empty document for a page with nothing to parse.

    Attributes stay the strings the page wrote: bs4 would split `class` into a list for every
    tag as it builds the tree, on any Unicode whitespace. soupsieve splits a
    class string itself when a selector asks, on ASCII whitespace as HTML and browsers do, and
    so does `_classes`: a class that contains a no-break space is one class, as in a browser.

    Always a document, so the profile's selectors are compiled (and a broken one raises) on
    every page, not only on pages that happen to contain markup.
    """
    if b"<" not in body:
        # No tag can be spelled without "<" (in any ASCII-compatible charset or UTF-16/32), and
        # bs4 warns that short tagless input "looks like a filename or URL"; under
        # `-W error` that warning would be an exception for a page that simply has no items.
        return _empty_soup()
    if body.startswith(b"<?xml"):
        # bs4 warns when a document starts like XML (XMLParsedAsHTMLWarning); an XHTML page with
        # an XML prolog is still HTML to us. One leading space avoids the check and changes
        # nothing for the HTML parser or for bs4's reading of the prolog's `encoding=`.
        body = b" " + body
    try:
        # An unknown charset name from the header makes lxml raise LookupError, which bs4 turns
        # into a rejection of that encoding and moves on to detection (BOM, <meta>, utf-8).
        return BeautifulSoup(
            body, "lxml", from_encoding=encoding or None, multi_valued_attributes=None
        )
    except ParserRejectedMarkup:
        # Every candidate encoding was rejected: there is nothing to read, which is an empty
        # page, not a crash.
        return _empty_soup()


def _empty_soup() -> BeautifulSoup:
    return BeautifulSoup("", "lxml", multi_valued_attributes=None)


def _free(soup: BeautifulSoup) -> None:
    """Take the parsed tree apart, so reference counting frees it now.

    A bs4 tree is one big reference cycle (parents, children, siblings), which only the cyclic
    garbage collector frees. With many pages in flight per worker process those trees pile up
    into full collections that took about a fifth of a worker's CPU. `soup.decompose()` would
    not do it: the document object itself links to no next element, so it is its children that
    are decomposed.
    """
    for child in list(soup.contents):
        child.decompose()


class _Selector(Protocol):
    """A compiled CSS selector (soupsieve's SoupSieve, reached through bs4's `soup.css`)."""

    def select_one(self, tag: Tag) -> Tag | None: ...


@dataclass(frozen=True, slots=True)
class _Fields:
    """How to read one item's fields, with the profile's selectors compiled once per page.

    Compiling once matters: `Tag.select_one(str)` looks the selector up in soupsieve's cache on
    every call, about a sixth of the parse time on a 1,000-item page.
    """

    page_url: str
    active_class: str
    start_text_format: str
    title: _Selector
    link: _Selector
    description: _Selector
    start: _Selector

    @classmethod
    def compile(cls, soup: BeautifulSoup, page_url: str, profile: SourceProfile) -> _Fields:
        css = soup.css
        return cls(
            page_url=page_url,
            active_class=profile.active_class,
            start_text_format=profile.start_text_format,
            title=css.compile(profile.title),
            link=css.compile(profile.link),
            description=css.compile(profile.description),
            start=css.compile(profile.start),
        )

    def item(self, element: Tag) -> ProjectItem | None:
        title_tag = self.title.select_one(element)
        title = collapse_whitespace(title_tag.get_text()) if title_tag is not None else ""
        if not title:
            return None
        url = _link(self.link.select_one(element), self.page_url)
        if url is None:
            return None
        description_tag = self.description.select_one(element)
        description = (
            collapse_whitespace(description_tag.get_text()) if description_tag is not None else ""
        )
        return ProjectItem(
            url=url,
            title=title,
            description=description,
            is_active=self.active_class in _classes(element),
            start_date=_start_date(self.start.select_one(element), self.start_text_format),
        )


def _classes(tag: Tag) -> list[str]:
    value = tag.get("class")
    return _CLASS_NAME.findall(value) if isinstance(value, str) else []


def collapse_whitespace(text: str) -> str:
    # str.split() with no argument splits on every Unicode whitespace, NBSP included.
    return " ".join(text.split())


def _link(tag: Tag | None, page_url: str) -> str | None:
    return None if tag is None else resolve_link(tag.get("href"), page_url)


def resolve_link(href: object, page_url: str) -> str | None:
    """`href` as an absolute http(s) URL against the page, or None when it is no project link."""
    if not isinstance(href, str) or not href.strip():
        return None
    try:
        url = urljoin(page_url, href.strip())
        parts = urlsplit(url)
    except ValueError:
        # e.g. "http://[::1" is an invalid IPv6 host; a link we cannot resolve is no link.
        return None
    if parts.scheme not in _WEB_SCHEMES or not parts.netloc:
        # javascript:, mailto:, data: and the like are not project pages.
        return None
    return url


def _start_date(tag: Tag | None, text_format: str) -> datetime.date | None:
    return (
        None if tag is None else read_start_date(tag.get("datetime"), tag.get_text(), text_format)
    )


def read_start_date(machine: object, text: str, text_format: str) -> datetime.date | None:
    """The `datetime` attribute as an ISO date, else the text in `text_format`, else None."""
    if isinstance(machine, str):
        parsed = _iso_date(machine.strip())
        if parsed is not None:
            return parsed
    # No usable machine-readable value: the human-readable text is the only other source.
    try:
        return datetime.datetime.strptime(collapse_whitespace(text), text_format).date()
    except ValueError:
        return None


def _iso_date(value: str) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        pass
    try:
        # A datetime: the project starts on its calendar day as written, whatever the offset.
        return datetime.datetime.fromisoformat(value).date()
    except ValueError:
        return None

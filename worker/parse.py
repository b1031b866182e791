"""Turn one listing page into project items, by the CSS selectors of a `SourceProfile`.

Pure: bytes in, values out, no I/O. A page from the wild may be malformed, truncated, in any
charset or not HTML at all, so `parse_listing` never raises on content: what it cannot read it
skips (and counts) or leaves empty. Only a broken profile (a selector the parser cannot read)
raises, because that is a configuration error to fail on, not a page to shrug at;
`check_profile` finds it at worker start (`ProfileError`).

Two parsers can read the page (`SOURCE_PARSER`): BeautifulSoup on lxml with soupsieve's
selectors (`worker/soup_tree.py`, the default) and lxml's own tree with the selectors translated
to XPath by cssselect (`worker/lxml_tree.py`). The field rules (whitespace, links, dates, the
active class, what is skipped) are written once, here, over `PageTree` (`worker/page_tree.py`),
the small interface both implement; tests/unit/test_parse_differential.py holds the two to
identical results.
"""

from __future__ import annotations

import datetime
import functools
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from core.settings import SourceParser, SourceProfile
from worker import lxml_tree, soup_tree
from worker.page_tree import ItemField, NodeT, PageTree

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
    body: bytes,
    page_url: str,
    profile: SourceProfile,
    encoding: str | None = None,
    parser: SourceParser = "beautifulsoup",
) -> ParsedPage:
    """Parse a listing page; `encoding` is the charset of the HTTP Content-Type, if it had one.

    Items without a title or a usable http(s) link are skipped and counted; a page with no
    items, or one the parser rejects outright, is `ParsedPage([], 0)`. Raises only for a
    selector in `profile` that `parser` cannot read (`ProfileError` for lxml, soupsieve's
    SelectorSyntaxError for BeautifulSoup).
    """
    markup = _markup(body)
    if parser == "lxml":
        return _read(lxml_tree.LxmlTree.parse(markup, encoding, profile), page_url, profile)
    return _read(soup_tree.SoupTree.parse(markup, encoding, profile), page_url, profile)


def check_profile(profile: SourceProfile, parser: SourceParser) -> None:
    """Raise `ProfileError` naming the first selector of `profile` that `parser` cannot read.

    For the worker's start: a page would raise the same, on every page.
    """
    if parser == "lxml":
        lxml_tree.compile_profile(profile)
    else:
        soup_tree.check_profile(profile)


def _markup(body: bytes) -> bytes | None:
    """The bytes to give a parser, the same for both; None for a page with nothing to parse.

    Both parsers still compile the profile's selectors for a None, so a broken profile raises
    on every page, not only on pages that happen to contain markup.
    """
    if b"<" not in body:
        # No tag can be spelled without "<" (in any ASCII-compatible charset or UTF-16/32), and
        # bs4 warns that short tagless input "looks like a filename or URL"; under
        # `-W error` that warning would be an exception for a page that simply has no items.
        return None
    if body.startswith(b"<?xml"):
        # bs4 warns when a document starts like XML (XMLParsedAsHTMLWarning); an XHTML page with
        # an XML prolog is still HTML to us. One leading space avoids the check and changes
        # nothing for the HTML parser or for the reading of the prolog's `encoding=`.
        return b" " + body
    return body


def _read(tree: PageTree[NodeT], page_url: str, profile: SourceProfile) -> ParsedPage:
    try:
        items: list[ProjectItem] = []
        skipped = 0
        for element in tree.items():
            item = _item(tree, element, page_url, profile)
            if item is None:
                skipped += 1
            else:
                items.append(item)
        return ParsedPage(items, skipped)
    finally:
        tree.close()


def _item(
    tree: PageTree[NodeT], element: NodeT, page_url: str, profile: SourceProfile
) -> ProjectItem | None:
    """The item's fields by the rules of the profile, or None for an item to skip."""
    title_node = tree.first(ItemField.TITLE, element)
    title = collapse_whitespace(tree.text(title_node)) if title_node is not None else ""
    if not title:
        return None
    link_node = tree.first(ItemField.LINK, element)
    url = None if link_node is None else resolve_link(tree.attribute(link_node, "href"), page_url)
    if url is None:
        return None
    description_node = tree.first(ItemField.DESCRIPTION, element)
    description = (
        collapse_whitespace(tree.text(description_node)) if description_node is not None else ""
    )
    start_node = tree.first(ItemField.START, element)
    start_date = (
        None
        if start_node is None
        else read_start_date(
            tree.attribute(start_node, "datetime"),
            tree.text(start_node),
            profile.start_text_format,
        )
    )
    classes = _CLASS_NAME.findall(tree.attribute(element, "class") or "")
    return ProjectItem(
        url=url,
        title=title,
        description=description,
        is_active=profile.active_class in classes,
        start_date=start_date,
    )


def collapse_whitespace(text: str) -> str:
    # str.split() with no argument splits on every Unicode whitespace, NBSP included.
    return " ".join(text.split())


def resolve_link(href: object, page_url: str) -> str | None:
    """`href` as an absolute http(s) URL against the page, or None when it is no project link."""
    if not isinstance(href, str) or not (href := href.strip()):
        return None
    if _PLAIN_ROOT_PATH.fullmatch(href) and "/." not in href:
        origin = _origin(page_url)
        if origin is not None:
            return origin + href
    return _joined_link(href, page_url)


# A path from the site's root ("/projects/7") that urljoin would copy as it is: none of the
# parts it splits off and may drop when empty (";", "?", "#"), no dot segments, no second "/"
# that starts a host, nothing it strips. A listing's links are mostly these, and urljoin, which
# splits the page's URL anew for every link, was most of a page's link resolving.
_PLAIN_ROOT_PATH = re.compile(r"/(?!/)[A-Za-z0-9\-._~!$&'()*+,=@%/]*")


@functools.lru_cache(maxsize=64)
def _origin(page_url: str) -> str | None:
    """`scheme://host` of an http(s) page, as urljoin writes it; None for another page."""
    try:
        parts = urlsplit(page_url)
    except ValueError:
        return None
    if parts.scheme not in _WEB_SCHEMES or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def _joined_link(href: str, page_url: str) -> str | None:
    try:
        url = urljoin(page_url, href)
        parts = urlsplit(url)
    except ValueError:
        # e.g. "http://[::1" is an invalid IPv6 host; a link we cannot resolve is no link.
        return None
    if parts.scheme not in _WEB_SCHEMES or not parts.netloc:
        # javascript:, mailto:, data: and the like are not project pages.
        return None
    return url


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

"""BeautifulSoup's reading of a page for worker/parse.py: bs4 on lxml, selectors by soupsieve."""

from __future__ import annotations

import soupsieve
from bs4 import BeautifulSoup, ParserRejectedMarkup, Tag

from core.settings import SourceProfile
from worker.page_tree import ItemField, ProfileError


class SoupTree:
    """A page as BeautifulSoup builds it, with the profile's selectors compiled for it.

    Compiling once per page matters: `Tag.select_one(str)` looks the selector up in soupsieve's
    cache on every call, about a sixth of the parse time on a 1,000-item page.
    """

    __slots__ = ("_fields", "_item", "_soup")

    def __init__(self, soup: BeautifulSoup, profile: SourceProfile) -> None:
        css = soup.css
        self._soup = soup
        self._item = css.compile(profile.item)
        self._fields = {field: css.compile(getattr(profile, field.value)) for field in ItemField}

    @classmethod
    def parse(cls, markup: bytes | None, encoding: str | None, profile: SourceProfile) -> SoupTree:
        return cls(_soup(markup, encoding), profile)

    def items(self) -> list[Tag]:
        return list(self._item.select(self._soup))

    def first(self, field: ItemField, item: Tag) -> Tag | None:
        return self._fields[field].select_one(item)

    def text(self, node: Tag) -> str:
        return node.get_text()

    def attribute(self, node: Tag, name: str) -> str | None:
        value = node.get(name)
        return value if isinstance(value, str) else None

    def close(self) -> None:
        """Take the parsed tree apart, so reference counting frees it now.

        A bs4 tree is one big reference cycle (parents, children, siblings), which only the
        cyclic garbage collector frees. With many pages in flight per worker process those trees
        pile up into full collections that took about a fifth of a worker's CPU.
        `soup.decompose()` would not do it: the document object itself links to no next
        element, so it is its children that are decomposed.
        """
        for child in list(self._soup.contents):
            child.decompose()


def check_profile(profile: SourceProfile) -> None:
    for name in ("item", *(field.value for field in ItemField)):
        selector = getattr(profile, name)
        try:
            soupsieve.compile(selector)
        except soupsieve.SelectorSyntaxError as error:
            raise ProfileError(
                f"SOURCE_PROFILE__{name.upper()}={selector!r} is no CSS selector soupsieve can "
                f"read (SOURCE_PARSER=beautifulsoup): {error}"
            ) from None


def _soup(markup: bytes | None, encoding: str | None) -> BeautifulSoup:
    """The parsed page; an empty document for a page with nothing to parse.

    Attributes stay the strings the page wrote: bs4 would split `class` into a list for every
    tag as it builds the tree, on any Unicode whitespace. soupsieve splits a class string
    itself when a selector asks, on ASCII whitespace as HTML and browsers do, and so do the
    field rules: a class that contains a no-break space is one class, as in a browser.
    """
    if markup is None:
        return _empty_soup()
    try:
        # An unknown charset name from the header makes lxml raise LookupError, which bs4 turns
        # into a rejection of that encoding and moves on to detection (BOM, <meta>, utf-8).
        return BeautifulSoup(
            markup, "lxml", from_encoding=encoding or None, multi_valued_attributes=None
        )
    except ParserRejectedMarkup:
        # Every candidate encoding was rejected: there is nothing to read, which is an empty
        # page, not a crash.
        return _empty_soup()


def _empty_soup() -> BeautifulSoup:
    return BeautifulSoup("", "lxml", multi_valued_attributes=None)

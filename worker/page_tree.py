"""The small interface a parser implements for worker/parse.py's field rules, and its errors."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Protocol, TypeVar


class ProfileError(ValueError):
    """A selector of the profile that the chosen parser cannot read; the message names it."""


class ItemField(enum.Enum):
    """The profile's selectors that are looked up inside an item, by their profile names."""

    TITLE = "title"
    LINK = "link"
    DESCRIPTION = "description"
    START = "start"


NodeT = TypeVar("NodeT")


class PageTree(Protocol[NodeT]):
    """One parsed page as the field rules read it; `NodeT` is the parser's own element type.

    `items` are the elements the profile's item selector matches, in document order; `first` is
    the first element in document order that a field's selector matches inside `item` (not
    `item` itself), as soupsieve's `select_one` finds it; `text` is an element's text as
    BeautifulSoup's `get_text()` gives it; `attribute` is a value as the page wrote it, None
    when absent. `close` lets the tree go.
    """

    def items(self) -> Iterable[NodeT]: ...

    def first(self, field: ItemField, item: NodeT) -> NodeT | None: ...

    def text(self, node: NodeT) -> str: ...

    def attribute(self, node: NodeT, name: str) -> str | None: ...

    def close(self) -> None: ...

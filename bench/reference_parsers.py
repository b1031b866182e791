"""The parsers ours is measured against, all reading the same fields into the same items.

- `parse_with_bs4`: the original design's way, BeautifulSoup with the profile's CSS selectors
  (`html.parser` for the baseline, `lxml` to show what the tree builder alone is worth);
- `parse_with_lxml`: raw lxml, a C tree and hand-written XPath for the default profile, the
  practical floor for any parser written in Python on top of lxml.

Each returns the same `ProjectItem`s as `worker.parse.parse_listing` on the bench's pages, which
`bench/parse.py` asserts before anything is timed.
"""

from __future__ import annotations

from typing import Any

from bs4 import BeautifulSoup, Tag
from lxml import etree

from core.settings import SourceProfile
from worker.parse import ProjectItem, collapse_whitespace, read_start_date, resolve_link


def parse_with_bs4(
    body: bytes, page_url: str, profile: SourceProfile, features: str = "html.parser"
) -> list[ProjectItem]:
    """BeautifulSoup and soupsieve, one `select_one` per field, as the original design did."""
    soup = BeautifulSoup(body, features)
    items: list[ProjectItem] = []
    for element in soup.select(profile.item):
        title_tag = element.select_one(profile.title)
        title = collapse_whitespace(title_tag.get_text()) if title_tag is not None else ""
        link_tag = element.select_one(profile.link)
        url = resolve_link(link_tag.get("href") if link_tag is not None else None, page_url)
        if not title or url is None:
            continue
        description_tag = element.select_one(profile.description)
        start_tag: Tag | None = element.select_one(profile.start)
        items.append(
            ProjectItem(
                url=url,
                title=title,
                description=collapse_whitespace(description_tag.get_text())
                if description_tag
                else "",
                is_active=profile.active_class in element.get_attribute_list("class"),
                start_date=None
                if start_tag is None
                else read_start_date(
                    start_tag.get("datetime"), start_tag.get_text(), profile.start_text_format
                ),
            )
        )
    return items


def _has_class(name: str) -> str:
    return f"contains(concat(' ', normalize-space(@class), ' '), ' {name} ')"


# The default profile's selectors, translated by hand; `[1]` on a step stops at the first.
_ITEMS = etree.XPath(f"//*[{_has_class('project')}]")
_TITLE = etree.XPath(f"descendant::*[{_has_class('project-title')}][1]")
_LINK = etree.XPath(f"descendant::a[ancestor::*[{_has_class('project-title')}]][1]/@href")
_DESCRIPTION = etree.XPath(f"descendant::*[{_has_class('project-description')}][1]")
_START = etree.XPath(f"descendant::time[{_has_class('project-start')}][1]")


def _text(element: Any) -> str:
    return "".join(element.itertext())


def parse_with_lxml(body: bytes, page_url: str, profile: SourceProfile) -> list[ProjectItem]:
    """lxml's C tree and XPath for the default profile: parse plus XPath, nothing else."""
    root = etree.fromstring(body, etree.HTMLParser())
    items: list[ProjectItem] = []
    for element in _ITEMS(root):
        titles = _TITLE(element)
        title = collapse_whitespace(_text(titles[0])) if titles else ""
        hrefs = _LINK(element)
        url = resolve_link(str(hrefs[0]) if hrefs else None, page_url)
        if not title or url is None:
            continue
        descriptions = _DESCRIPTION(element)
        starts = _START(element)
        items.append(
            ProjectItem(
                url=url,
                title=title,
                description=collapse_whitespace(_text(descriptions[0])) if descriptions else "",
                is_active=profile.active_class in element.get("class", "").split(),
                start_date=None
                if not starts
                else read_start_date(
                    starts[0].get("datetime"), _text(starts[0]), profile.start_text_format
                ),
            )
        )
    return items

"""lxml's reading of a page for worker/parse.py: libxml2's tree, the profile's CSS selectors
translated to XPath by cssselect and compiled once per profile.

BeautifulSoup's lxml builder is fed by the same libxml2 parser, so the trees agree; where bs4
reads that tree its own way, this module does the same, and tests/unit/test_parse_differential.py
holds the two to identical items:

- decoding: the encodings bs4 tries, in its order (its own `EncodingDetector`: the HTTP
  charset, a byte-order mark, the document's declaration, charset detection, utf-8,
  windows-1252), each given to an HTML parser made as bs4 makes it, and the next one tried
  when the parser rejects it;
- text: bs4 keeps the strings inside script, style, template, rt and rp apart (other string
  classes), and `get_text()` of an element leaves out the strings of another class than its
  own, so `text` does too;
- class names: soupsieve splits a class attribute on ASCII whitespace, form feed included, and
  XPath's `normalize-space` does not know the form feed, so `~=` and `.class` translate it to a
  space first;
- selectors: soupsieve matches a selector against the whole document and takes the matches
  among the candidates, the item's descendants for a field (not the item itself), so `.a .b`
  finds a `.b` in an item that is itself `.a`; each field's selector is therefore evaluated once
  per page, from the root, and each item gets its first match in document order;
- templates: to soupsieve a template's content is no part of the document: `select` does not
  enter a template (nor does `select_one`, but into the item itself), and a selector's
  combinators stop at one; so the matches here leave out elements inside a template, and a
  template item's fields are matched within its content only;
- only selector features whose meaning is the same in soupsieve and cssselect are taken
  (`_unlike_soupsieve`), any other fails at `compile_profile`, at worker start.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cssselect
from bs4.builder import HTMLTreeBuilder
from bs4.dammit import EncodingDetector
from cssselect import parser as css
from lxml import etree

from core.settings import SourceProfile
from worker.page_tree import ItemField, ProfileError

# Elements whose strings bs4 gives a class of their own (Script, Stylesheet, TemplateString,
# RubyTextString, RubyParenthesisString), read from bs4 so the two lists cannot drift apart.
_STRING_CONTAINERS = frozenset(HTMLTreeBuilder.DEFAULT_STRING_CONTAINERS)
# An XPath string holding a form feed: XPath has no escapes, and lxml refuses control
# characters in an expression, so EXSLT decodes one.
_FORM_FEED = "str:decode-uri('%0C')"
_NAMESPACES = {"str": "http://exslt.org/strings"}
# Pseudo-classes that mean the same in soupsieve and cssselect's translation.
_SAME_PSEUDO = frozenset(
    {"first-child", "last-child", "only-child", "first-of-type", "last-of-type", "only-of-type"}
)
_SAME_FUNCTIONS = frozenset({"nth-child", "nth-last-child", "nth-of-type", "nth-last-of-type"})


class _Translator(cssselect.HTMLTranslator):
    """cssselect's HTML translation, with class lists split on ASCII whitespace as soupsieve."""

    def xpath_attrib_includes(
        self, xpath: cssselect.xpath.XPathExpr, name: str, value: str | None
    ) -> cssselect.xpath.XPathExpr:
        if value and cssselect.xpath.is_non_whitespace(value):
            words = f"translate({name}, {_FORM_FEED}, ' ')"
            xpath.add_condition(
                f"{name} and contains({name}, {self.xpath_literal(value)}) "
                f"and contains(concat(' ', normalize-space({words}), ' '), "
                f"{self.xpath_literal(' ' + value + ' ')})"
            )
        else:
            xpath.add_condition("0")
        return xpath


_TRANSLATOR = _Translator()
_PLAIN_TRANSLATOR = cssselect.HTMLTranslator()
# Whether any attribute of the page holds a form feed: only then does a class list need it
# translated, which costs every class test an EXSLT call.
_HAS_FORM_FEED = etree.XPath(f"boolean(//@*[contains(., {_FORM_FEED})])", namespaces=_NAMESPACES)


@dataclass(frozen=True, slots=True)
class Selectors:
    """A profile's selectors as XPath, each evaluated from the root, templates' contents left
    out; and the fields' again, for the content of a template item (from the item)."""

    item: etree.XPath
    fields: dict[ItemField, etree.XPath]
    fields_in_template: dict[ItemField, etree.XPath]


@dataclass(frozen=True, slots=True)
class CompiledProfile:
    """The profile's selectors for a page with a form feed in an attribute, and for others."""

    splitting_form_feeds: Selectors
    plain: Selectors


def compile_profile(profile: SourceProfile) -> CompiledProfile:
    """The profile's selectors compiled; `ProfileError` naming the first one that cannot be."""
    return _compile(profile.item, *(getattr(profile, field.value) for field in ItemField))


@functools.lru_cache(maxsize=8)
def _compile(item: str, *fields: str) -> CompiledProfile:
    named = list(zip(ItemField, fields, strict=True))

    def selectors(translator: cssselect.HTMLTranslator) -> Selectors:
        return Selectors(
            item=_xpath(translator, "item", item, "descendant-or-self::", _OUTSIDE_TEMPLATES),
            fields={
                field: _xpath(
                    translator, field.value, selector, "descendant-or-self::", _OUTSIDE_TEMPLATES
                )
                for field, selector in named
            },
            fields_in_template={
                field: _xpath(translator, field.value, selector, "descendant::", "")
                for field, selector in named
            },
        )

    # Without a form feed in the page the two translations match the same elements.
    return CompiledProfile(
        splitting_form_feeds=selectors(_TRANSLATOR), plain=selectors(_PLAIN_TRANSLATOR)
    )


# A selector's matches, as soupsieve finds them, are never in a template's content.
_OUTSIDE_TEMPLATES = "[not(ancestor::template)]"


def _xpath(
    translator: cssselect.HTMLTranslator, name: str, selector: str, prefix: str, where: str
) -> etree.XPath:
    """`selector` translated, each match from `prefix` on, filtered by the predicate `where`."""

    def refuse(reason: str) -> ProfileError:
        return ProfileError(
            f"SOURCE_PROFILE__{name.upper()}={selector!r} cannot be used with "
            f"SOURCE_PARSER=lxml: {reason}; change the selector, or set "
            "SOURCE_PARSER=beautifulsoup"
        )

    try:
        # A group's selectors joined by " | ", each with the prefix; pseudo-elements refused.
        expression = translator.css_to_xpath(selector, prefix=prefix)
    except cssselect.SelectorError as error:
        raise refuse(f"cssselect cannot translate it to XPath ({error})") from None
    for one in css.parse(selector):
        unlike = _unlike_soupsieve(one.parsed_tree)
        if unlike is not None:
            raise refuse(f"{unlike} may match otherwise than with BeautifulSoup (soupsieve)")
    # A union is in document order, as soupsieve's matches are.
    expression = f"({expression}){where}"
    try:
        return etree.XPath(expression, namespaces=_NAMESPACES)
    except etree.XPathSyntaxError as error:
        raise refuse(f"its XPath {expression!r} does not compile ({error})") from None


def _unlike_soupsieve(tree: Any) -> str | None:
    """The first part of a parsed selector whose meaning differs in soupsieve, else None."""
    if isinstance(tree, css.Element):
        # soupsieve needs the namespaces declared to read a prefix; cssselect prints it as is.
        return None if tree.namespace is None else f"the namespaced element {tree.namespace}|"
    if isinstance(tree, css.Class | css.Hash):
        return _unlike_soupsieve(tree.selector)
    if isinstance(tree, css.Attrib):
        if tree.operator != "exists" and tree.attrib.lower() == "type":
            # soupsieve compares `type` values case-insensitively in HTML, cssselect exactly.
            return f"[{tree.attrib}{tree.operator}…]"
        if tree.namespace:
            return f"the namespaced attribute {tree.namespace}|{tree.attrib}"
        return _unlike_soupsieve(tree.selector)
    if isinstance(tree, css.Pseudo):
        if tree.ident.lower() not in _SAME_PSEUDO:
            return f":{tree.ident}"
        return _unlike_soupsieve(tree.selector)
    if isinstance(tree, css.Function):
        if tree.name.lower() not in _SAME_FUNCTIONS:
            return f":{tree.name}()"
        return _unlike_soupsieve(tree.selector)
    if isinstance(tree, css.Negation):
        return _unlike_soupsieve(tree.selector) or _unlike_soupsieve(tree.subselector)
    if isinstance(tree, css.CombinedSelector):
        return _unlike_soupsieve(tree.selector) or _unlike_soupsieve(tree.subselector)
    return f"{type(tree).__name__.lower()} selectors"


class LxmlTree:
    """A page as libxml2 builds it, read as `worker.soup_tree.SoupTree` reads bs4's tree."""

    __slots__ = ("_firsts", "_items", "_near_containers", "_root", "_selectors")

    def __init__(self, root: etree._Element | None, compiled: CompiledProfile) -> None:
        self._root = root
        self._selectors = (
            compiled.splitting_form_feeds
            if root is not None and _HAS_FORM_FEED(root)
            else compiled.plain
        )
        self._items: set[etree._Element] = set()
        # Per field, each item's first match; made on the field's first lookup.
        self._firsts: dict[ItemField, dict[etree._Element, etree._Element]] = {}
        # Made on the first `text`; see `_containers_around`.
        self._near_containers: set[etree._Element] | None = None

    @classmethod
    def parse(cls, markup: bytes | None, encoding: str | None, profile: SourceProfile) -> LxmlTree:
        compiled = compile_profile(profile)
        return cls(None if markup is None else _root(markup, encoding), compiled)

    def items(self) -> list[etree._Element]:
        if self._root is None:
            return []
        found: list[etree._Element] = self._selectors.item(self._root)
        # Held, so that an element met again is the same proxy object (lxml keeps one per
        # element while it is referenced) and set lookups find it.
        self._items = set(found)
        return found

    def first(self, field: ItemField, item: etree._Element) -> etree._Element | None:
        if item.tag == "template":
            return self._first_in_template(field, item)
        firsts = self._firsts.get(field)
        if firsts is None:
            firsts = self._firsts[field] = self._first_matches(field)
        return firsts.get(item)

    def _first_matches(self, field: ItemField) -> dict[etree._Element, etree._Element]:
        """Each item's first match of the field's selector among its descendants."""
        firsts: dict[etree._Element, etree._Element] = {}
        matches: list[etree._Element] = self._selectors.fields[field](self._root)
        items = self._items
        for match in matches:  # in document order: the first one an item meets is its first
            for ancestor in match.iterancestors():
                if ancestor in items and ancestor not in firsts:
                    firsts[ancestor] = match
        return firsts

    def _first_in_template(
        self, field: ItemField, template: etree._Element
    ) -> etree._Element | None:
        """The first match in a template item's own content (not in a template inside it)."""
        matches: list[etree._Element] = self._selectors.fields_in_template[field](template)
        for match in matches:
            if next(match.iterancestors("template")) is template:
                return match
        return None

    def text(self, node: etree._Element) -> str:
        if self._near_containers is None:
            self._near_containers = _containers_around(self._root)
        if node not in self._near_containers:
            # No container in it or around it: every string is a plain one.
            return "".join(node.itertext())
        tag = node.tag
        if tag in _STRING_CONTAINERS:
            return "".join(_strings(node, tag, tag))
        if next(node.iterancestors(*_STRING_CONTAINERS), None) is not None:
            # Every string below a container is the container's class, never the plain one.
            return ""
        return "".join(_strings(node, None, None))

    def attribute(self, node: etree._Element, name: str) -> str | None:
        value = node.get(name)
        return value if isinstance(value, str) else None

    def close(self) -> None:
        # libxml2's tree has no reference cycles: dropping the root and the held elements
        # frees it.
        self._root = None
        self._items = set()
        self._firsts = {}
        self._near_containers = None


def _containers_around(root: etree._Element | None) -> set[etree._Element]:
    """The containers of `root`, the elements inside them and the elements around them.

    The elements whose text needs more than `itertext()`; a page's few scripts and styles make
    it a small set, mostly head and body. Holding the elements keeps their proxies alive, so a
    later lookup of the same element finds the same object.
    """
    near: set[etree._Element] = set()
    if root is not None:
        for container in root.iter(*_STRING_CONTAINERS):
            near.add(container)
            near.update(container.iterancestors())
            near.update(container.iterdescendants())
    return near


def _strings(element: etree._Element, container: str | None, wanted: str | None) -> Iterator[str]:
    """The strings below `element` whose container (None: none) is `wanted`, in order.

    `container` is the innermost container element around `element`'s own text.
    """
    if element.text and container == wanted:
        yield element.text
    for child in element:
        tag = child.tag
        if isinstance(tag, str):
            # An element; comments and processing instructions have no strings bs4 reads.
            yield from _strings(child, tag if tag in _STRING_CONTAINERS else container, wanted)
        if child.tail and container == wanted:
            yield child.tail


def _root(markup: bytes, encoding: str | None) -> etree._Element | None:
    """The page's tree as bs4's lxml builder would build it, or None when every encoding fails.

    As bs4 does (`LXMLTreeBuilder.prepare_markup` and `feed`): the encodings in the
    detector's order, the markup without its byte-order mark, one parser per try with bs4's
    options and the same errors taken as a rejection of that encoding.
    """
    detector = EncodingDetector(
        markup, known_definite_encodings=[encoding] if encoding else [], is_html=True
    )
    for candidate in detector.encodings:
        try:
            return _tree(detector.markup, candidate)
        except (UnicodeDecodeError, LookupError, etree.ParserError):
            # bs4 takes these as a rejection of the encoding, and tries the next one.
            continue
    return None


def _tree(markup: bytes, encoding: str) -> etree._Element | None:
    try:
        return _feed(markup, etree.HTMLParser(recover=True, huge_tree=False, encoding=encoding))
    except etree.XMLSyntaxError:
        pass
    # libxml2 stopped part way (a charset conversion that failed, say): lxml's tree parser then
    # raises and keeps nothing, while bs4's parser, which takes libxml2's events as a target,
    # keeps the elements that came before and raises nothing. A TreeBuilder target gets those
    # same events; it is slower than the tree parser, so only this rare page pays for it.
    builder = etree.TreeBuilder()
    parser = etree.HTMLParser(target=builder, recover=True, huge_tree=False, encoding=encoding)
    try:
        return _feed(markup, parser)
    except etree.XMLSyntaxError:
        # Not one element came before it stopped ("missing toplevel element").
        return None


def _feed(markup: bytes, parser: etree.HTMLParser) -> etree._Element | None:
    # One feed of the whole markup and a close, as bs4's LXMLTreeBuilder.feed.
    parser.feed(markup)
    root: etree._Element | None = parser.close()
    return root

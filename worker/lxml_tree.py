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
- selectors: a field's is looked for below the item, not in the item itself, as `select_one`
  does; only selector features whose meaning is the same in soupsieve and cssselect are taken
  (`_SAME_IN_BOTH`), any other fails at `compile_profile`, at worker start.
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


@dataclass(frozen=True, slots=True)
class CompiledProfile:
    """A profile's selectors as XPath: the items from the root, each field below an item."""

    item: etree.XPath
    fields: dict[ItemField, etree.XPath]


def compile_profile(profile: SourceProfile) -> CompiledProfile:
    """The profile's selectors compiled; `ProfileError` naming the first one that cannot be."""
    return _compile(profile.item, *(getattr(profile, field.value) for field in ItemField))


@functools.lru_cache(maxsize=8)
def _compile(item: str, *fields: str) -> CompiledProfile:
    return CompiledProfile(
        item=_xpath("item", item, "descendant-or-self::", first=False),
        fields={
            field: _xpath(field.value, selector, "descendant::", first=True)
            for field, selector in zip(ItemField, fields, strict=True)
        },
    )


def _xpath(name: str, selector: str, prefix: str, *, first: bool) -> etree.XPath:
    def refuse(reason: str) -> ProfileError:
        return ProfileError(
            f"SOURCE_PROFILE__{name.upper()}={selector!r} cannot be used with "
            f"SOURCE_PARSER=lxml: {reason}; change the selector, or set "
            "SOURCE_PARSER=beautifulsoup"
        )

    try:
        # A group's selectors joined by " | ", each with the prefix; pseudo-elements refused.
        expression = _TRANSLATOR.css_to_xpath(selector, prefix=prefix)
    except cssselect.SelectorError as error:
        raise refuse(f"cssselect cannot translate it to XPath ({error})") from None
    for one in css.parse(selector):
        unlike = _unlike_soupsieve(one.parsed_tree)
        if unlike is not None:
            raise refuse(f"{unlike} may match otherwise than with BeautifulSoup (soupsieve)")
    if first:
        # The first match in document order, as select_one; a union is in document order.
        expression = f"({expression})[1]"
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

    __slots__ = ("_compiled", "_root")

    def __init__(self, root: etree._Element | None, compiled: CompiledProfile) -> None:
        self._root = root
        self._compiled = compiled

    @classmethod
    def parse(cls, markup: bytes | None, encoding: str | None, profile: SourceProfile) -> LxmlTree:
        compiled = compile_profile(profile)
        return cls(None if markup is None else _root(markup, encoding), compiled)

    def items(self) -> list[etree._Element]:
        if self._root is None:
            return []
        found: list[etree._Element] = self._compiled.item(self._root)
        return found

    def first(self, field: ItemField, item: etree._Element) -> etree._Element | None:
        found: list[etree._Element] = self._compiled.fields[field](item)
        return found[0] if found else None

    def text(self, node: etree._Element) -> str:
        tag = node.tag
        if tag in _STRING_CONTAINERS:
            return "".join(_strings(node, tag, tag))
        if next(node.iterancestors(*_STRING_CONTAINERS), None) is not None:
            # Every string below a container is the container's class, never the plain one.
            return ""
        if next(node.iterdescendants(*_STRING_CONTAINERS), None) is None:
            return "".join(node.itertext())
        return "".join(_strings(node, None, None))

    def attribute(self, node: etree._Element, name: str) -> str | None:
        value = node.get(name)
        return value if isinstance(value, str) else None

    def close(self) -> None:
        # libxml2's tree has no reference cycles: dropping the root frees it.
        self._root = None


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

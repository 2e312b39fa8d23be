"""A small lxml toolkit: typed properties bound to XPath-like paths.

In the spirit of virt-manager's ``XMLProperty``: a device class declares
``driver_type = XMLProperty("./driver/@type")`` and reads or writes it as an
attribute; missing elements are created on write, and ``None`` removes.
Paths are limited to ``./a/b``, ``./a/b/@attr`` and ``./@attr`` forms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from lxml import etree


def parse(xml: str | bytes) -> etree._Element:
    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    if isinstance(xml, str):
        xml = xml.encode()
    return etree.fromstring(xml, parser)


def tostring(node: etree._Element) -> str:
    # with_tail=False: an element taken from a parsed document (a network's
    # <host>) is sent alone, without the whitespace that followed it.
    return etree.tostring(node, pretty_print=True, encoding="unicode", with_tail=False)


def _split(path: str) -> tuple[list[str], str | None]:
    if not path.startswith("./"):
        raise ValueError(f"XMLProperty paths start with './': {path!r}")
    parts = [p for p in path[2:].split("/") if p]
    attr = None
    if parts and parts[-1].startswith("@"):
        attr = parts.pop()[1:]
    return parts, attr


def find_or_create(node: etree._Element, parts: list[str]) -> etree._Element:
    for tag in parts:
        child = node.find(tag)
        if child is None:
            child = etree.SubElement(node, tag)
        node = child
    return node


class XMLProperty:
    """A value stored at ``path`` below the object's ``node``."""

    def __init__(self, path: str, kind: Callable[[str], Any] = str):
        self.path = path
        self.kind = kind
        self.parts, self.attr = _split(path)

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        target = obj.node
        for tag in self.parts:
            target = target.find(tag)
            if target is None:
                return None
        raw = target.get(self.attr) if self.attr else target.text
        if raw is None:
            return None
        if self.kind is bool:
            return raw in ("yes", "on", "true", "1")
        return self.kind(raw)

    def __set__(self, obj: Any, value: Any) -> None:
        if value is None:
            self._remove(obj.node)
            return
        if isinstance(value, bool):
            value = "yes" if value else "no"
        target = find_or_create(obj.node, self.parts)
        if self.attr:
            target.set(self.attr, str(value))
        else:
            target.text = str(value)

    def _remove(self, node: etree._Element) -> None:
        for tag in self.parts:
            node = node.find(tag)
            if node is None:
                return
        if self.attr:
            node.attrib.pop(self.attr, None)
            if node.attrib or len(node) or (node.text or "").strip() or not self.parts:
                return
        # An element left with nothing in it is removed too (<target/> is invalid).
        if node.getparent() is not None:
            node.getparent().remove(node)


class XMLObject:
    """Base for objects that wrap one element; subclasses declare properties.

    ``Cls()`` starts an empty ``<TAG>``, ``Cls(xml_text)`` reads libvirt's
    document, ``Cls(element)`` wraps a node of a larger document (a device).
    """

    TAG = ""

    def __init__(self, node: etree._Element | str | bytes | None = None):
        if isinstance(node, str | bytes):
            node = parse(node)
        self.node: etree._Element = node if node is not None else etree.Element(self.TAG)

    def to_xml(self) -> str:
        return tostring(self.node)


Child = TypeVar("Child", bound=XMLObject)


class ChildList(list[Child]):
    """The children a ``XMLChildren`` found; ``add()`` appends a new one."""

    def __init__(self, kind: type[Child], parent: etree._Element, parts: list[str], found):
        super().__init__(kind(n) for n in found)
        self._kind, self._parent, self._parts = kind, parent, parts

    def add(self, **values: Any) -> Child:
        """A new child at the end (its container made if missing), with ``values``
        set through its properties in the order given."""
        container = find_or_create(self._parent, self._parts[:-1])
        child = self._kind(etree.SubElement(container, self._parts[-1]))
        for key, value in values.items():
            setattr(child, key, value)
        self.append(child)
        return child


class XMLChildren(Generic[Child]):
    """Repeated child elements at ``path`` (``./disks/disk``), each read as ``kind``."""

    def __init__(self, kind: type[Child], path: str):
        self.kind = kind
        self.parts, attr = _split(path)
        if attr or not self.parts:
            raise ValueError(f"XMLChildren paths name elements: {path!r}")

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        container = obj.node
        for tag in self.parts[:-1]:
            container = container.find(tag)
            if container is None:
                return ChildList(self.kind, obj.node, self.parts, [])
        return ChildList(self.kind, obj.node, self.parts, container.findall(self.parts[-1]))


class XMLFlag:
    """An empty child element whose presence means true (``<readonly/>``)."""

    def __init__(self, tag: str):
        self.tag = tag

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.node.find(self.tag) is not None

    def __set__(self, obj: Any, value: bool) -> None:
        present = obj.node.find(self.tag)
        if value and present is None:
            etree.SubElement(obj.node, self.tag)
        elif not value and present is not None:
            obj.node.remove(present)

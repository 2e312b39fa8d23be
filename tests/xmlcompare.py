"""Compare XML documents as parsed trees: whitespace between elements and the
order of attributes do not matter, the order of elements does."""

from lxml import etree


def canonical(xml: str | bytes) -> str:
    parser = etree.XMLParser(remove_blank_text=True)
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml, parser)
    return etree.tostring(root, method="c14n").decode()


def assert_same_xml(got: str, expected: str) -> None:
    assert canonical(got) == canonical(expected)

"""The XML toolkit: properties, flags and repeated children."""

from salt_kvm.virt.xmlmodel import XMLChildren, XMLFlag, XMLObject, XMLProperty
from tests.xmlcompare import assert_same_xml


class Item(XMLObject):
    TAG = "item"
    name = XMLProperty("./@name")
    size = XMLProperty("./size", int)


class Box(XMLObject):
    TAG = "box"
    label = XMLProperty("./label")
    sealed = XMLFlag("sealed")
    items = XMLChildren(Item, "./items/item")


def test_children_are_added_in_order_under_one_container():
    box = Box()
    box.label = "b"
    box.items.add(name="one", size=1)
    box.items.add(name="two")
    box.sealed = True
    assert_same_xml(
        box.to_xml(),
        "<box><label>b</label><items><item name='one'><size>1</size></item>"
        "<item name='two'/></items><sealed/></box>",
    )


def test_children_read_from_text():
    box = Box("<box><items><item name='a'><size>3</size></item><item name='b'/></items></box>")
    assert [(i.name, i.size) for i in box.items] == [("a", 3), ("b", None)]
    assert Box("<box/>").items == []
    assert not Box("<box/>").sealed


def test_none_removes_an_attribute_and_an_emptied_element():
    item = Item("<item name='x'><size>2</size></item>")
    item.name = None
    item.size = None
    assert_same_xml(item.to_xml(), "<item/>")


def test_a_node_of_a_document_is_written_alone():
    box = Box("<box>\n  <items>\n    <item name='a'/>\n    <item name='b'/>\n  </items>\n</box>")
    assert_same_xml(box.items[0].to_xml(), "<item name='a'/>")
    assert box.items[0].to_xml().strip() == '<item name="a"/>'

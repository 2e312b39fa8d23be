"""An image URL's credentials (``user:password@``, ``?token=``) open the
download and go nowhere else: not into events, logs at any level, the
domain's XML and salt-kvm metadata, nor volume names."""

import hashlib
import logging

import pytest

from salt_kvm.cloud import provision
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import SaltKvmError
from salt_kvm.images import cache as images
from salt_kvm.images import fetch
from salt_kvm.virt import lifecycle
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback
from tests.imageserver import ImageServer

GIB = 1024**3
USER, PASSWORD, TOKEN = "imguser", "Img-Pa55word", "tok-9f8e7d6c5b4a"
IMAGE = b"QFI\xfb" + b"\0" * 4096


@pytest.fixture
def server():
    srv = ImageServer({"/d.qcow2": IMAGE}, require_auth=(USER, PASSWORD), require_token=TOKEN)
    yield srv
    srv.close()


def _secret_url(server, password=PASSWORD):
    plain = server.url("/d.qcow2")
    return plain.replace("http://", f"http://{USER}:{password}@") + f"?token={TOKEN}"


def _assert_clean(text):
    assert PASSWORD not in text and TOKEN not in text and f"{USER}:" not in text


def test_credentials_in_the_url_open_the_download(server, caplog):
    with caplog.at_level(logging.DEBUG):
        source = fetch.open_source(_secret_url(server))
        assert b"".join(source.chunks()) == IMAGE
    _assert_clean(caplog.text)


def test_a_refused_download_names_the_url_without_its_secrets(server, caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(SaltKvmError) as err:
        b"".join(fetch.open_source(_secret_url(server, password="Wrong-Pa55word")).chunks())
    assert "401" in str(err.value) and server.url("/d.qcow2") in str(err.value)
    _assert_clean(str(err.value) + caplog.text)
    assert "Wrong-Pa55word" not in str(err.value) + caplog.text


def test_a_guest_on_a_secret_url_keeps_no_secret(conn, pool, server, caplog):
    digest = hashlib.sha256(IMAGE).hexdigest()
    name = f"image-sha256-{digest[:32]}.qcow2"
    pool.createXML(
        f"<volume><name>{name}</name><capacity>{GIB}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    )
    spec = build_spec(
        {
            "name": "vm1",
            "image": _secret_url(server),
            "image_checksum": f"sha256:{digest}",
            "image_pool": "default-pool",
            "virt_type": "qemu",
            "deploy": False,
        }
    )
    events = []
    with caplog.at_level(logging.DEBUG):
        guest = provision.create(conn, spec, Rollback(), lambda s, d: events.append((s, d)))
    xml = guest.domain.XMLDesc(0)
    info = Domain(xml).managed_info()
    assert info["image_source"] == server.url("/d.qcow2")
    volumes = " ".join(p.listVolumes().__repr__() for p in conn.listAllStoragePools())
    _assert_clean(repr(events) + caplog.text + xml + volumes)
    _assert_clean(repr(images.list_images(conn, "default-pool")))
    lifecycle.remove(conn, "vm1")


def test_the_cache_key_ignores_credentials_and_tokens():
    one = images.ImageSpec(source=f"https://u:{PASSWORD}@h.example/d.qcow2?token={TOKEN}")
    two = images.ImageSpec(source="https://h.example/d.qcow2")
    assert images.cache_key(one, '"e1"') == images.cache_key(two, '"e1"')
    assert one.shown == "https://h.example/d.qcow2"

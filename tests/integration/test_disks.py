"""External disks on real libvirtd: hot-plugged into ONE booted guest (seen and
used inside it over SSH), the module and the states through real salt-call, and
every refusal on a cheap shut-off clone with its definition unchanged."""

import os
import subprocess
import time
from pathlib import Path

import libvirt
import pytest
import yaml

from salt_kvm import ssh
from salt_kvm.cloud import addresses
from salt_kvm.disks import ops as diskops
from salt_kvm.disks import spec as disks
from salt_kvm.errors import ConflictError, NotFoundError, SpecError
from salt_kvm.virt import lifecycle, pools
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.units import GIB

from .conftest import GUEST_PASSWORD, GUEST_USER, IMAGES, POOL, prefixed_volumes, unique
from .guests import quick_clone
from .saltenv import minion_config, salt_call, salt_call_cmd

MARKER = b"salt-kvm read-only image\n"


def make_clone(hv, base_domain, stem):
    return quick_clone(hv, base_domain, unique(stem))


def remove(hv, dom):
    """The clone and every volume salt-kvm made for its disks."""
    name = dom.name()
    doomed, kept = diskops.split_for_destroy(dom, delete=True)
    lifecycle.remove(hv, name)
    diskops.delete_volumes(hv, doomed + kept)


@pytest.fixture(scope="module")
def guest(hv, base_domain):
    """One booted guest for the module, with an SSH session."""
    dom = make_clone(hv, base_domain, "disk")
    try:
        dom.create()
        mac = Domain(dom.XMLDesc(0)).interfaces[0].mac
        ip = addresses.wait_for_addresses(dom, addresses.SOURCE_LEASE, timeout=300, macs=[mac])[0]
        with ssh.connect(ip, GUEST_USER, password=GUEST_PASSWORD, timeout=300) as session:
            yield dom, session
    finally:
        remove(hv, dom)


@pytest.fixture(scope="module")
def stopped(hv, base_domain):
    """A shut-off clone: refusals are checked on it (cheap, never booted)."""
    dom = make_clone(hv, base_domain, "off")
    yield dom
    remove(hv, dom)


@pytest.fixture(scope="module")
def raw_image(hv):
    """An existing raw image in the pool, starting with MARKER."""
    path = f"{IMAGES}/{unique('ro')}.raw"
    with open(path, "wb") as handle:
        handle.write(MARKER.ljust(1024 * 1024, b"\0"))
        handle.truncate(64 * 1024 * 1024)
    pools.refresh(hv.storagePoolLookupByName(POOL))
    yield path
    if os.path.exists(path):
        os.unlink(path)
    pools.refresh(hv.storagePoolLookupByName(POOL))


@pytest.fixture(scope="module")
def minion(tmp_path_factory):
    outside = tmp_path_factory.mktemp("allowed")
    srv = tmp_path_factory.mktemp("srv")
    conf = minion_config(
        tmp_path_factory.mktemp("minion"),
        kvm={"disk": {"allowed_dirs": [str(outside)]}},
        file_roots={"base": [str(srv)]},
    )
    return conf, outside


def wait_in_guest(session, command, expect, timeout=180):
    """Poll ``command`` in the guest until ``expect(output)``; the output."""
    deadline = time.monotonic() + timeout
    while True:
        code, out, _ = session.run(command)
        if code == 0 and expect(out):
            return out
        assert time.monotonic() < deadline, f"{command!r} never matched: {out!r}"
        time.sleep(1)


def by_id(name):
    return f"/dev/disk/by-id/virtio-{name}"


def present(session, name):
    return wait_in_guest(session, f"test -e {by_id(name)} && readlink -f {by_id(name)}", bool)


def absent(session, name):
    wait_in_guest(session, f"test -e {by_id(name)} || echo gone", lambda out: "gone" in out)


def definition(dom):
    return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


# ---- on the booted guest ---------------------------------------------------------


@pytest.fixture
def data_disk(hv, guest):
    """The guest's 2G "data" disk at index 1, as the hotplug test leaves it
    (attached here when that test did not run first)."""
    dom, session = guest
    if "data" not in diskops.describe(hv, dom):
        attach(hv, dom, "data", size="2G", index=1)
        present(session, "data")
    return dom


def test_new_qcow2_disk_hotplugs_keeps_its_data_across_detach_and_reattach(hv, guest, minion):
    dom, session = guest
    conf, _ = minion
    name = dom.name()
    new = salt_call(conf, "kvm_disk.attach", name, "data", "size=2G", "index=1")
    assert new["target"] == "vdb" and new["format"] == "qcow2" and new["size"] == 2 * GIB
    assert new["created"] and new["live"] and new["persistent"]
    assert new["allocation"] < 64 * 1024 * 1024  # sparse
    assert new["source"] == f"{IMAGES}/{name}-data.qcow2"
    dev = present(session, "data").strip()
    lsblk = session.check(f"lsblk -bdno NAME,SIZE {dev}").split()
    assert lsblk == [dev.rsplit("/", 1)[1], str(2 * GIB)]
    session.check(
        f"mkfs.ext4 -q -L data {dev} && mkdir -p /mnt/data && mount {dev} /mnt/data && "
        "head -c 1M /dev/urandom > /mnt/data/file && sha256sum /mnt/data/file > /root/sum && "
        "umount /mnt/data && sync"
    )
    listed = salt_call(conf, "kvm_disk.list", name)
    assert listed["data"]["created"] and listed["vda"]["created"] is False

    detached = salt_call(conf, "kvm_disk.detach", name, "data")
    assert detached["old"]["target"] == "vdb" and detached["deleted"] is None
    absent(session, "data")
    assert "data" not in salt_call(conf, "kvm_disk.list", name)
    assert "ua-data" not in definition(dom)
    assert os.path.exists(new["source"])  # detach keeps the volume

    again = salt_call(conf, "kvm_disk.attach", name, "data", "size=2G", "index=1")
    assert again["source"] == new["source"] and again["created"]
    dev = present(session, "data").strip()
    session.check(f"mount {dev} /mnt/data && sha256sum -c /root/sum && umount /mnt/data")


def test_disk_grows_live_and_never_shrinks(hv, guest, data_disk):
    dom, session = guest
    grown = diskops.resize(hv, dom, "data", 3 * GIB)
    assert grown == {"old": 2 * GIB, "new": 3 * GIB}
    dev = present(session, "data").strip()
    wait_in_guest(session, f"lsblk -bdno SIZE {dev}", lambda out: out.strip() == str(3 * GIB))
    assert diskops.resize(hv, dom, "data", 3 * GIB) == {}
    before = definition(dom)
    with pytest.raises(SpecError, match="^size: 2G is smaller than the current 3G"):
        diskops.resize(hv, dom, "data", 2 * GIB)
    assert definition(dom) == before


def test_existing_raw_image_attached_readonly_is_read_only_in_the_guest(hv, guest, raw_image):
    dom, session = guest
    spec = disks.parse_disk("image", {"path": raw_image, "readonly": True})
    info = diskops.attach(hv, dom, spec)
    assert info["format"] == "raw" and info["readonly"] and not info["created"]
    dev = present(session, "image").strip()
    assert session.check(f"lsblk -dno RO {dev}").strip() == "1"
    assert session.check(f"head -c {len(MARKER)} {dev}").encode() == MARKER
    code, _, _ = session.run(f"echo x | dd of={dev} oflag=direct 2>&1")
    assert code != 0
    diskops.detach(hv, dom, "image")
    absent(session, "image")
    assert os.path.exists(raw_image)  # never salt-kvm's to delete


def test_states_apply_once_then_report_nothing(hv, guest, minion):
    dom, session = guest
    conf, _ = minion
    name = dom.name()
    args = ["kvm_disk.attached", "logs", f"domain={name}", "size=1G", "bus=virtio"]

    before = definition(dom)
    (dry,) = salt_call(conf, "state.single", *args, "test=True").values()
    assert dry["result"] is None and dry["changes"]["new"]["source"] == "1G volume"
    assert definition(dom) == before and "logs" not in diskops.describe(hv, dom)

    (first,) = salt_call(conf, "state.single", *args).values()
    assert first["result"] is True and first["changes"]["old"] is None
    assert first["changes"]["new"]["size"] == GIB
    present(session, "logs")
    (second,) = salt_call(conf, "state.single", *args).values()
    assert second["result"] is True and second["changes"] == {}
    (grow,) = salt_call(conf, "state.single", *args[:-2], "size=2G", "test=True").values()
    assert grow["result"] is None and grow["changes"]["new"] == {"size": 2 * GIB}

    gone = ["kvm_disk.detached", "logs", f"domain={name}", "delete=True"]
    before = definition(dom)
    (dry,) = salt_call(conf, "state.single", *gone, "test=True").values()
    assert dry["result"] is None and dry["changes"]["new"] is None
    assert definition(dom) == before
    (first,) = salt_call(conf, "state.single", *gone).values()
    assert first["result"] is True and first["changes"]["deleted"].endswith("-logs.qcow2")
    absent(session, "logs")
    assert not os.path.exists(first["changes"]["deleted"])
    (second,) = salt_call(conf, "state.single", *gone).values()
    assert second["result"] is True and second["changes"] == {}


# ---- refusals: nothing changes -------------------------------------------------


def refused(hv, dom, error, match, fn, *args, **kwargs):
    before = definition(dom)
    volumes = prefixed_volumes(hv)  # this process's: the other stream's change beside
    with pytest.raises(error, match=match):
        fn(hv, dom, *args, **kwargs)
    assert definition(dom) == before
    assert prefixed_volumes(hv) == volumes


def attach(hv, dom, name, **values):
    return diskops.attach(hv, dom, disks.parse_disk(name, values), ())


def test_refusals_leave_the_definition_unchanged(
    hv, guest, data_disk, stopped, raw_image, base_domain
):
    running, _ = guest
    data = diskops.describe(hv, running)["data"]["source"]
    base_disk = Domain(hv.lookupByName(base_domain).XMLDesc(0)).disks[0].path
    attach(hv, stopped, "first", size="1G", index=1, bus="sata")

    # a path another domain uses writable, or that backs other volumes
    refused(hv, stopped, ConflictError, "used by domain", attach, "x", path=data)
    refused(hv, stopped, ConflictError, "used by domain", attach, "x", path=data, shareable=True)
    refused(hv, stopped, ConflictError, "used by domain", attach, "x", path=base_disk)
    # duplicate index / target / name
    refused(
        hv,
        stopped,
        ConflictError,
        r"^index: 1 \(sdb\)",
        attach,
        "x",
        size="1G",
        index=1,
        bus="scsi",
    )
    refused(
        hv,
        stopped,
        ConflictError,
        "^name: .* already has a disk named 'first'",
        attach,
        "first",
        size="1G",
    )
    # a size smaller than the current one
    refused(hv, stopped, SpecError, "^size: ", diskops.resize, "first", GIB // 2)
    # outside pools and allowed directories
    refused(
        hv,
        stopped,
        SpecError,
        "^path: /etc/hostname is outside",
        attach,
        "x",
        path="/etc/hostname",
        format="raw",
    )
    # deleting a volume salt-kvm did not create
    attach(hv, stopped, "img", path=raw_image, readonly=True)
    refused(
        hv,
        stopped,
        SpecError,
        "^delete: salt-kvm did not create",
        diskops.detach,
        "img",
        delete=True,
    )
    with pytest.raises(NotFoundError, match="no domain named"):
        lifecycle.lookup(hv, unique("missing"))


@pytest.fixture
def stopped_with_first(hv, stopped):
    """The shut-off clone with its 1G "first" disk on sata index 1, as
    test_refusals_leave_the_definition_unchanged leaves it."""
    if "first" not in diskops.describe(hv, stopped):
        attach(hv, stopped, "first", size="1G", index=1, bus="sata")
    return stopped


def test_module_refusals_through_salt_call(hv, stopped_with_first, minion):
    stopped = stopped_with_first
    conf, outside = minion
    before = definition(stopped)
    name = stopped.name()
    for args, message in [
        (["size=1G", "format=qcow3"], "format: 'qcow3' is not allowed (accepted: qcow2, raw, vdi"),
        (["path=/etc/hostname", "format=raw"], "is outside the storage pools"),
        (["size=1G", "index=1", "bus=sata"], "index: 1 (sdb) is already used"),
    ]:
        proc = subprocess.run(
            [*salt_call_cmd(conf, quiet=False), "kvm_disk.attach", name, "bad", *args],
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stdout
    missing = subprocess.run(
        [*salt_call_cmd(conf, quiet=False), "kvm_disk.list", unique("missing")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "no domain named" in missing.stdout + missing.stderr
    assert definition(stopped) == before
    # an allowed directory from kvm:disk:allowed_dirs
    image = outside / "extra.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "16M"], check=True)
    info = salt_call(conf, "kvm_disk.attach", name, "extra", f"path={image}", "format=raw")
    assert info["source"] == str(image) and info["persistent"] and not info["live"]
    salt_call(conf, "kvm_disk.detach", name, "extra")
    assert definition(stopped) == before


def test_states_from_an_sls_with_state_apply(hv, stopped, minion):
    """The hypervisor's highstate path: kvm_disk states in an sls file."""
    conf, _ = minion
    srv = yaml.safe_load((conf / "minion").read_text())["file_roots"]["base"][0]
    sls = {
        "scratch": {"kvm_disk.attached": [{"domain": stopped.name()}, {"size": "1G"}]},
        "gone": {"kvm_disk.detached": [{"name": "never-there"}, {"domain": stopped.name()}]},
    }
    (Path(srv) / "disks.sls").write_text(yaml.safe_dump(sls))
    first = salt_call(conf, "state.apply", "disks")
    assert all(r["result"] is True for r in first.values()), first
    assert sum(bool(r["changes"]) for r in first.values()) == 1
    second = salt_call(conf, "state.apply", "disks")
    assert all(r["result"] is True and not r["changes"] for r in second.values()), second
    assert diskops.describe(hv, stopped)["scratch"]["created"]


# ---- escapes a guest or a local user could try (issue #13 item 12) -------------------


def test_a_qcow2_header_in_a_guest_written_file_is_not_trusted(hv, stopped, tmp_path):
    """A guest can write a qcow2 header, whose backing file is any host file,
    into its raw disk; attached again without format, libvirt's probe would
    have QEMU open that host file. Refused naming format; format=raw is safe."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"root:$6$secret\n".ljust(65536, b"\0"))
    path = f"{IMAGES}/{unique('guestraw')}.img"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", path],
        check=True,
    )
    try:
        pool = hv.storagePoolLookupByName(POOL)
        pools.refresh(pool)
        before = stopped.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        with pytest.raises(SpecError) as err:
            diskops.attach(hv, stopped, disks.parse_disk("evil", {"path": path}))
        assert err.value.key == "format" and "qcow2" in str(err.value)
        assert stopped.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
        planned = diskops.plan(
            hv, stopped, disks.parse_disk("evil", {"path": path, "format": "raw"})
        )
        assert planned.source.format == "raw"
    finally:
        os.unlink(path)
        pools.refresh(hv.storagePoolLookupByName(POOL))


def test_a_symlink_in_the_pool_to_a_host_file_is_refused(hv, stopped):
    link = f"{IMAGES}/{unique('link')}.raw"
    os.symlink("/etc/hostname", link)
    try:
        before = stopped.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        with pytest.raises(SpecError, match=r"^path: .*a link to /etc/hostname.*outside"):
            diskops.attach(hv, stopped, disks.parse_disk("evil", {"path": link, "format": "raw"}))
        assert stopped.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
    finally:
        os.unlink(link)
        pools.refresh(hv.storagePoolLookupByName(POOL))


def test_the_boot_disk_is_detached_only_with_force(hv, stopped):
    before = stopped.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    with pytest.raises(SpecError, match="^force: disk 'vda' is the boot disk"):
        diskops.detach(hv, stopped, "vda")
    assert stopped.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before

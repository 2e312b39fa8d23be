"""A virtiofs share on a booted guest, through real salt-cloud: the guest
mounts it at first boot (cloud-init, fstab), a file the host writes after the
boot is read in the guest, the guest's writes reach the host, show_instance
shows the share, and fstab keeps the mount for later boots. One guest."""

import os
import shutil
import tempfile
import time

import pytest

from salt_kvm.virt import virtiofs
from salt_kvm.virt.domain import new_domain

from .cloudcheck import assert_gone, created, sized_profile
from .conftest import PREFIX, prefixed_volumes, unique
from .saltenv import provider

TAG = "hostdata"
MOUNT = "/mnt/hostdata"


@pytest.fixture(scope="module")
def allowed():
    """The provider's allowed directory: root's, 0700, in a root-owned sticky
    /var/tmp (the path rule holds), with the shared directory in it."""
    root = tempfile.mkdtemp(prefix=f"{PREFIX}shares-", dir="/var/tmp")
    os.mkdir(os.path.join(root, "data"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(hv, salt, base_domain, allowed):
    name = unique("share")
    before = prefixed_volumes(hv)
    providers = provider()
    providers["test-kvm"]["share_allowed_dirs"] = [allowed]
    salt.write_providers(providers)
    shares = [{"source": f"{allowed}/data", "tag": TAG, "mount": MOUNT}]
    salt.write_profiles({"share": sized_profile(base_domain, salt, shares=shares)}, "share.conf")
    started = time.monotonic()
    info = created(salt.cloud("-p", "share", name), name)
    print(f"create with a share: {time.monotonic() - started:.1f} s")
    yield name, info
    salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, lambda: prefixed_volumes(hv))


def guest_run(salt, name, command, timeout=60):
    return salt.salt(name, "cmd.run", command, timeout=timeout)[name]


def wait_mounted(salt, name):
    """cloud-init's runcmd (its last stage) mounts the share at first boot;
    systemd mounts it from fstab on later boots."""
    wait = f"for i in $(seq 300); do findmnt -n {MOUNT} >/dev/null && break; sleep 1; done"
    guest_run(salt, name, wait, timeout=330)
    return guest_run(salt, name, f"findmnt -n -o SOURCE,FSTYPE {MOUNT}")


def test_a_share_defines_on_the_real_libvirtd(hv, allowed):
    """The XML salt-kvm makes is what this libvirt (and its schema) accepts."""
    xml = new_domain(unique("sharedef"), "qemu", 256, 1, f"{allowed}/none.qcow2")
    virtiofs.add_shares(xml, [virtiofs.Share(f"{allowed}/data", TAG, False)])
    dom = hv.defineXMLFlags(xml.to_xml(), 1)  # VIR_DOMAIN_DEFINE_VALIDATE
    try:
        defined = dom.XMLDesc(0)
        assert "<driver type='virtiofs'/>" in defined
        assert "<access mode='shared'/>" in defined
    finally:
        dom.undefine()


def test_the_guest_reads_a_file_the_host_writes_after_boot(salt, guest, allowed):
    name, _ = guest
    assert wait_mounted(salt, name).split() == [TAG, "virtiofs"]
    # In fstab (nofail), written once: later boots mount it without cloud-init.
    assert guest_run(salt, name, f"grep -c '^{TAG} {MOUNT} virtiofs' /etc/fstab") == "1"
    with open(f"{allowed}/data/from-host.txt", "w") as handle:
        handle.write("written on the host after boot\n")
    got = salt.salt(name, "file.read", f"{MOUNT}/from-host.txt")[name]
    assert got == "written on the host after boot\n"
    guest_run(salt, name, f"echo from the guest > {MOUNT}/from-guest.txt")
    with open(f"{allowed}/data/from-guest.txt") as handle:
        assert handle.read() == "from the guest\n"


def test_show_instance_shows_the_share(salt, guest, allowed):
    name, _ = guest
    shown = created(salt.cloud("-a", "show_instance", name, "--assume-yes"), name)
    assert shown["shares"] == [
        {"source": f"{allowed}/data", "tag": TAG, "readonly": False, "mount": MOUNT}
    ]

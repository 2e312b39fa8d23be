"""Ejecting the seed from a guest that keeps its tray locked."""

import libvirt
import pytest

from salt_kvm.cloud import seed

XML = """<domain type='qemu'><name>vm1</name><devices>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
<source file='/pool/vm1-seed.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>
</devices></domain>"""


class LockedTray:
    def __init__(self, error="operation failed: timed out waiting to open tray of 'hdc'"):
        self.error, self.calls = error, []

    def XMLDesc(self, flags):
        return XML

    def isActive(self):
        return True

    def updateDeviceFlags(self, xml, flags):
        self.calls.append((xml, flags))
        if not flags & libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE:
            raise libvirt.libvirtError(self.error)


def test_a_locked_tray_is_forced_open():
    dom = LockedTray()
    seed.eject(dom, "hdc")
    (_, first), (xml, second) = dom.calls
    assert second == first | libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE
    assert "<source" not in xml


def test_other_errors_are_not_forced():
    dom = LockedTray(error="Requested operation is not valid: domain is not running")
    with pytest.raises(libvirt.libvirtError):
        seed.eject(dom, "hdc")
    assert len(dom.calls) == 1

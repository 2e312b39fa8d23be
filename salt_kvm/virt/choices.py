"""The hypervisor-side values a profile or a minion's config may choose: the
default libvirt URI and the domain types. Free of libvirt, so the profile
parsers can check them (salt_kvm.virt.connection re-exports them)."""

from __future__ import annotations

from salt_kvm.errors import SpecError

DEFAULT_URI = "qemu:///system"
VIRT_KVM = "kvm"
VIRT_QEMU = "qemu"
VIRT_AUTO = "auto"
VIRT_TYPES = (VIRT_KVM, VIRT_QEMU, VIRT_AUTO)


def check_virt_type(value: object, key: str = "virt_type") -> str:
    if value is None:
        return VIRT_AUTO
    if value not in VIRT_TYPES:
        raise SpecError(key, f"{value!r} is not a domain type", VIRT_TYPES)
    return value

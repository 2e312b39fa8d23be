"""The profile's ``hostdevs``: host PCI and USB devices given to the guest.

Each item names one device: ``pci: 0000:03:00.0`` (or ``03:00.0``) or
``pci: 8086:10fb`` (vendor:product), ``usb: 046d:c52b`` or ``usb: {bus: 1,
device: 4}``. libvirt detaches a managed device from its host driver when the
guest starts and gives it back when it stops. That the device exists, is one,
is free and can be assigned is checked against the host when the VM is made
(:mod:`salt_kvm.cloud.hostcheck`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import boolean, check_keys, whole_number

PCI = "pci"
USB = "usb"
HOSTDEV_KEYS = (PCI, USB, "managed")
PCI_ADDRESS_RE = re.compile(
    r"(?:(?P<domain>[0-9a-f]{4}):)?(?P<bus>[0-9a-f]{2}):(?P<slot>[0-9a-f]{2})\.(?P<function>[0-7])"
)
VENDOR_PRODUCT_RE = re.compile(r"(?P<vendor>[0-9a-f]{4}):(?P<product>[0-9a-f]{4})")
ACCEPTED = (
    "a list of {pci: 0000:03:00.0}, {pci: VENDOR:PRODUCT} (e.g. 8086:10fb), "
    "{usb: VENDOR:PRODUCT} or {usb: {bus: 1, device: 4}}, each with managed (true)"
)


@dataclass(frozen=True)
class HostdevSpec:
    """One device as the profile names it: by address or by vendor:product."""

    bus: str  # PCI or USB
    address: tuple[int, ...] | None = None  # PCI: domain, bus, slot, function; USB: bus, device
    vendor: int | None = None
    product: int | None = None
    managed: bool = True

    @property
    def shown(self) -> str:
        if self.vendor is not None:
            return f"{self.bus} {self.vendor:04x}:{self.product or 0:04x}"
        assert self.address is not None
        if self.bus == PCI:
            d, b, s, f = self.address
            return f"pci {d:04x}:{b:02x}:{s:02x}.{f:x}"
        return f"usb bus {self.address[0]} device {self.address[1]}"


def _pci(value: Any, where: str) -> HostdevSpec:
    raw = str(value).strip().lower() if isinstance(value, str) else None
    if raw and (match := PCI_ADDRESS_RE.fullmatch(raw)):
        parts = match.group("domain") or "0000", match["bus"], match["slot"], match["function"]
        return HostdevSpec(PCI, address=tuple(int(p, 16) for p in parts))
    if raw and (match := VENDOR_PRODUCT_RE.fullmatch(raw)):
        return HostdevSpec(PCI, vendor=int(match["vendor"], 16), product=int(match["product"], 16))
    raise SpecError(
        f"{where}.pci",
        f"{value!r} is not a PCI address or vendor:product",
        "0000:03:00.0 (domain:bus:slot.function, as lspci -D shows it), 03:00.0, "
        "or 8086:10fb (vendor:product, as lspci -nn shows it)",
    )


def _usb(value: Any, where: str) -> HostdevSpec:
    accepted = "046d:c52b (vendor:product, as lsusb shows it) or {bus: 1, device: 4}"
    if isinstance(value, dict):
        unknown = set(value) - {"bus", "device"}
        if unknown or set(value) != {"bus", "device"}:
            raise SpecError(f"{where}.usb", "needs bus and device, and nothing else", accepted)
        bus = whole_number(value["bus"], f"{where}.usb.bus", 1, 255)
        device = whole_number(value["device"], f"{where}.usb.device", 1, 127)
        return HostdevSpec(USB, address=(bus, device))
    raw = str(value).strip().lower() if isinstance(value, str) else None
    if raw and (match := VENDOR_PRODUCT_RE.fullmatch(raw)):
        return HostdevSpec(USB, vendor=int(match["vendor"], 16), product=int(match["product"], 16))
    raise SpecError(
        f"{where}.usb", f"{value!r} is not a USB vendor:product or bus/device", accepted
    )


def parse_allowed(value: Any, key: str = "hostdev_allowed") -> list[HostdevSpec]:
    """The provider's ``hostdev_allowed``: the devices its profiles may take, in
    the forms of ``hostdevs``. None by default: a profile takes nothing of the
    host unless its operator lists it."""
    return parse_hostdevs(value, key)


def check_allowed(hostdevs: list[HostdevSpec], allowed: list[HostdevSpec]) -> None:
    """Without ``hostdev_allowed``, ``hostdevs`` are refused before anything
    (the devices themselves are matched when the VM is made)."""
    if hostdevs and not allowed:
        raise SpecError(
            "hostdevs",
            "the provider allows no host devices: a device given to a guest is taken from "
            "the host (managed detaches it from its host driver)",
            "hostdev_allowed in the provider configuration (cloud.providers.d) listing the "
            "devices its profiles may take, in the forms of hostdevs",
        )


def parse_hostdevs(value: Any, key: str = "hostdevs") -> list[HostdevSpec]:
    if value in (None, "", []):
        return []
    if not isinstance(value, list):
        raise SpecError(key, f"{value!r} is not a list of host devices", ACCEPTED)
    found: dict[HostdevSpec, int] = {}
    result = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise SpecError(where, f"{item!r} is not a host device", ACCEPTED)
        check_keys(item, HOSTDEV_KEYS, where)
        buses = [b for b in (PCI, USB) if item.get(b) not in (None, "")]
        if len(buses) != 1:
            raise SpecError(where, "needs exactly one of pci or usb", ACCEPTED)
        spec = _pci(item[PCI], where) if buses[0] == PCI else _usb(item[USB], where)
        label = f"{where}.managed"
        managed = boolean({label: item.get("managed")}, label, True)
        if spec in found:
            raise SpecError(
                where, f"{spec.shown} is given twice (in {key}[{found[spec]}])", "distinct devices"
            )
        found[spec] = index
        result.append(
            spec
            if managed
            else HostdevSpec(spec.bus, spec.address, spec.vendor, spec.product, managed=False)
        )
    return result

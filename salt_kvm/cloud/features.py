"""The profile's firmware, TPM and console keys → ``GuestFeatures`` (no libvirt).

``firmware: bios | efi`` and ``secure_boot``, ``tpm: true`` (an emulated TPM
2.0), ``graphics: vnc | spice | none`` with ``graphics_listen``: an address
the provider's ``graphics_listen_allowed`` lists (loopback otherwise). What the
host can do is checked later, against its domain capabilities, still before
anything is made (salt_kvm.virt.firmware).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import boolean, text

FIRMWARE_BIOS = "bios"
FIRMWARE_EFI = "efi"
FIRMWARES = (FIRMWARE_BIOS, FIRMWARE_EFI)
GRAPHICS_VNC = "vnc"
GRAPHICS_SPICE = "spice"
GRAPHICS_NONE = "none"
GRAPHICS = (GRAPHICS_VNC, GRAPHICS_SPICE, GRAPHICS_NONE)
LOOPBACK = "127.0.0.1"
KEYS = (
    "firmware",
    "secure_boot",
    "tpm",
    "graphics",
    "graphics_listen",
    "graphics_listen_allowed",
)


@dataclass
class GuestFeatures:
    # None: what the base domain has (an image-built guest: bios).
    firmware: str | None = None
    secure_boot: bool = False
    tpm: bool = False
    # None: the base's consoles, each given a password and a loopback listen.
    graphics: str | None = None
    graphics_listen: str = LOOPBACK
    listen_allowed: tuple[str, ...] = field(default_factory=tuple)


def _choice(values: dict, key: str, accepted: tuple[str, ...]) -> str | None:
    value = values.get(key)
    if value in (None, ""):
        return None
    if value is False and key == "graphics":  # YAML reads a bare ``none``/``no`` oddly
        return GRAPHICS_NONE
    if not isinstance(value, str) or value.lower() not in accepted:
        raise SpecError(key, f"{value!r} is not one of them", accepted)
    return value.lower()


def _address(value: object, key: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise SpecError(key, f"{value!r} is not an IP address", "e.g. 127.0.0.1") from None


def parse_allowed(value: object) -> tuple[str, ...]:
    key = "graphics_listen_allowed"
    if value in (None, "", []):
        return ()
    items = value if isinstance(value, list | tuple) else [value]
    return tuple(_address(item, f"{key}[{i}]") for i, item in enumerate(items))


def parse(values: dict) -> GuestFeatures:
    firmware = _choice(values, "firmware", FIRMWARES)
    secure_boot = boolean(values, "secure_boot", False)
    if secure_boot and firmware != FIRMWARE_EFI:
        raise SpecError(
            "secure_boot",
            "needs UEFI firmware: secure boot is a feature of the EFI firmware",
            "firmware: efi with secure_boot: true, or secure_boot: false",
        )
    graphics = _choice(values, "graphics", GRAPHICS)
    allowed = parse_allowed(values.get("graphics_listen_allowed"))
    listen = LOOPBACK
    given = text(values, "graphics_listen")
    if given is not None:
        listen = _address(given, "graphics_listen")
        if listen != LOOPBACK and listen not in allowed:
            raise SpecError(
                "graphics_listen",
                f"{listen} is not an address the provider allows consoles on",
                f"{LOOPBACK}, or one of the provider's graphics_listen_allowed: "
                f"{', '.join(allowed) or 'none listed'}",
            )
        if graphics == GRAPHICS_NONE:
            raise SpecError("graphics_listen", "only applies with a console", "graphics: vnc")
    return GuestFeatures(
        firmware=firmware,
        secure_boot=secure_boot,
        tpm=boolean(values, "tpm", False),
        graphics=graphics,
        graphics_listen=listen,
        listen_allowed=allowed,
    )

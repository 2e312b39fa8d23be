"""The profile's image keys (``image``, ``image_checksum``, ``image_format``,
``image_pool``, the provider's ``image_allowed_dirs``) → an ``ImageSpec``.
Free of libvirt, so the profile spec can parse them (salt_kvm.images.cache,
which fetches and caches the image, re-exports these names)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from salt_kvm import redact
from salt_kvm.disks import spec as disks
from salt_kvm.errors import SpecError
from salt_kvm.images import fetch
from salt_kvm.images.fetch import Checksum
from salt_kvm.virt.checks import object_name, one_of, text

DEFAULT_POOL = "default"
ACCEPTED_SOURCE = (
    "an http:// or https:// URL, a file:// URL, or the absolute path of an image file "
    "on the salt-cloud machine"
)


@dataclass(frozen=True)
class ImageSpec:
    source: str
    checksum: Checksum | None = None
    format: str = "auto"
    pool: str = DEFAULT_POOL

    @property
    def shown(self) -> str:
        """The source as logs, events, metadata and names may carry it: a URL's
        userinfo and query (credentials, signed tokens) left out."""
        return redact.url(self.source)


def parse_image(values: dict) -> ImageSpec:
    """The profile's ``image``, ``image_checksum``, ``image_format``, ``image_pool``."""
    source = text(values, "image", required=True)
    path = fetch.local_path(source)
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if path is None and scheme not in ("http", "https"):
        raise SpecError(
            "image", f"{redact.url(source)!r} is not a URL or absolute path", ACCEPTED_SOURCE
        )
    if path is not None:
        _check_local(path, values.get("image_allowed_dirs"))
    checksum = values.get("image_checksum")
    return ImageSpec(
        source=source,
        checksum=fetch.parse_checksum(checksum) if checksum not in (None, "") else None,
        format=one_of(values, "image_format", fetch.FORMAT_CHOICES, "auto"),
        pool=object_name(values, "image_pool") or DEFAULT_POOL,
    )


def _check_local(path: str, allowed: object) -> None:
    """A local image is read as root on the salt-cloud machine into a guest's
    disk (as raw, any file is an image): only below a directory the provider
    opens with ``image_allowed_dirs``, symbolic links resolved first."""
    dirs = [os.path.realpath(d) for d in disks.parse_allowed_dirs(allowed, "image_allowed_dirs")]
    real = os.path.realpath(path)
    if not disks.within(real, dirs):
        where = f"{path!r}" + (f" (really {real!r})" if real != os.path.normpath(path) else "")
        raise SpecError(
            "image",
            f"{where} is outside image_allowed_dirs",
            (
                f"a file below {', '.join(dirs)}"
                if dirs
                else "a file below a directory of image_allowed_dirs (provider configuration)"
            )
            + ", or an http(s) URL",
        )
    if not (os.path.isfile(real) and os.access(real, os.R_OK)):
        raise SpecError("image", f"{path!r} is not a readable file", ACCEPTED_SOURCE)

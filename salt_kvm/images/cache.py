"""Base images from URLs or files, cached as volumes of a storage pool.

An image is fetched once per pool and kept as ``image-<key>.<format>``, where
the key comes from the profile's checksum (``image-sha256-<32 hex>.qcow2``)
or, without one, from the source and its validator (see ``cache_key``). Guests
then use it as the backing volume of a linked clone or copy it (full clone).

Never half-visible: the download streams through a libvirt upload stream (so
it works over ``qemu+ssh://``; nothing is stored on the salt-cloud machine)
into a temporary volume ``image-<key>.part-<random>``. Only once all bytes
arrived and the checksum matched does libvirt copy it, inside the daemon
(``createXMLFrom``), to the final name; the temporary volume is then deleted.
libvirt cannot rename a volume, and a stream interrupted half-way would leave a
partial volume behind under whatever name it was written to: so the final
name only ever appears through one daemon-side copy of verified bytes. A
mismatch or any error deletes the temporary volume. Two salt-cloud processes on
one machine fetching the same image take turns (a lock file), and the second
finds the first one's volume.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import libvirt

from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError, SpecError
from salt_kvm.images import fetch
from salt_kvm.images.spec import (  # noqa: F401 - re-exported: the names' old home
    ACCEPTED_SOURCE,
    DEFAULT_POOL,
    ImageSpec,
    parse_image,
)
from salt_kvm.virt import chains, locks, pools
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.volumes import Volume, volume_format

log = logging.getLogger(__name__)

PREFIX = "image-"
_NAME_RE = re.compile(
    r"image-(?P<key>(?:sha256|sha512|md5|url)-[0-9a-f]{32})"
    r"(?:\.(?P<format>qcow2|raw)|\.part-(?P<part>[0-9a-f]{8}))"
)
Progress = Callable[[dict], None]


@dataclass
class CachedImage:
    name: str
    path: str
    format: str
    capacity: int
    pool: str
    source: str
    downloaded: bool = False


def cache_key(image: ImageSpec, validator: str | None) -> str:
    """With a checksum, the image is identified by it: any URL serving those
    bytes shares one volume, and it is never downloaded again. Without one, by
    the source and its validator (HTTP ETag or Last-Modified; a file's size and
    mtime): a changed file or a server announcing new content gives a new
    volume; a server sending neither validator is cached by URL alone. The
    URL's userinfo and query are credentials, not content: they are left out
    (a rotated token finds the same volume; give ``image_checksum`` when a
    query selects the content)."""
    if image.checksum is not None:
        return f"{image.checksum.algorithm}-{image.checksum.digest[:32]}"
    seed = f"{image.shown}\n{validator or ''}"
    return "url-" + hashlib.sha256(seed.encode()).hexdigest()[:32]


def parse_name(name: str) -> dict | None:
    """``{"key", "format", "complete"}`` for an image cache volume name, else None."""
    match = _NAME_RE.fullmatch(name)
    if not match:
        return None
    return {
        "key": match["key"],
        "format": match["format"],
        "complete": match["part"] is None,
    }


# ---- the pool side ---------------------------------------------------------


def _pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool:
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        raise NotFoundError(f"image_pool: no storage pool named {name!r}") from exc
    if not pool.isActive():
        raise SaltKvmError(f"image_pool: storage pool {name!r} is not active")
    return pool


def _cached(pool: libvirt.virStoragePool, vol: libvirt.virStorageVol, src: str) -> CachedImage:
    _, capacity, _ = vol.info()
    return CachedImage(vol.name(), vol.path(), volume_format(vol), capacity, pool.name(), src)


def _find(pool: libvirt.virStoragePool, key: str) -> libvirt.virStorageVol | None:
    for fmt in fetch.FORMATS:
        try:
            return pool.storageVolLookupByName(f"{PREFIX}{key}.{fmt}")
        except libvirt.libvirtError:
            continue
    return None


#: How long a second fetch of the same image waits for the first one.
FETCH_LOCK_TIMEOUT = 1800.0


@contextlib.contextmanager
def _local_lock(uri: str, pool: str, key: str) -> Iterator[None]:
    tag = hashlib.sha256(f"{uri}|{pool}|{key}".encode()).hexdigest()[:16]
    busy = f"another run is fetching image {key} into pool {pool}"
    with locks.held(
        f"image-{tag}.lock",
        f"fetching image {key} into pool {pool}",
        timeout=FETCH_LOCK_TIMEOUT,
        busy=busy,
    ):
        yield


def _volume_xml(name: str, capacity: int, fmt: str, mode: str) -> str:
    return Volume.new(name, capacity, fmt, mode).to_xml()


class _Progress:
    """Turns byte counts into at most ~20 reports (and one at the end)."""

    def __init__(self, report: Progress | None, source: fetch.Source):
        self.report, self.total, self.done = report, source.size, 0
        self.step = max(source.size // 20, 1) if source.size else 64 * 1024 * 1024
        self.next, self.started, self.reported = self.step, time.monotonic(), -1

    def count(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.done += len(chunk)
            if self.done >= self.next:
                self.next += self.step
                self.emit()
            yield chunk

    def emit(self) -> None:
        if self.reported == self.done:
            return
        self.reported = self.done
        data: dict[str, float | None] = {"received": self.done, "total": self.total}
        if self.total:
            data["percent"] = round(100 * self.done / self.total, 1)
        data["seconds"] = round(time.monotonic() - self.started, 1)
        log.info("image download: %s", data)
        if self.report is not None:
            self.report(data)


def _send_all(stream: libvirt.virStream, chunks: Iterator[bytes]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            sent = stream.send(view.tobytes())
            view = view[sent:]


def _upload(conn, pool, temp_name: str, chunks: Iterator[bytes]) -> None:
    """Stream ``chunks`` into a new raw volume; libvirt's pool refresh then
    reads its real format and size from the content."""
    vol = pool.createXML(_volume_xml(temp_name, 0, "raw", "0600"), 0)
    stream = conn.newStream(0)
    try:
        vol.upload(stream, 0, 0, 0)
        _send_all(stream, chunks)
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise


def _fetch(conn, pool, image: ImageSpec, source, key: str, progress) -> CachedImage:
    digests = fetch.Digests(image.checksum)
    counter = _Progress(progress, source)
    served = digests.wrap(counter.count(source.chunks()), "served")
    compression, data = fetch.decompressed(served)
    head, data = fetch.head_of(digests.wrap(data, "image"))
    fmt = fetch.check_image(head, image.format)
    log.info(
        "image %s: downloading into pool %s (%s%s)",
        image.shown,
        pool.name(),
        fmt,
        f", {compression}" if compression else "",
    )
    temp_name = f"{PREFIX}{key}.part-{uuid.uuid4().hex[:8]}"
    try:
        _upload(conn, pool, temp_name, data)
        counter.emit()
        digests.verify(compression is not None)
        pools.refresh(pool)
        temp = pool.storageVolLookupByName(temp_name)
        probed = volume_format(temp)
        if probed != fmt:
            raise SaltKvmError(f"image: libvirt reads the download as {probed}, not {fmt}")
        _, capacity, _ = temp.info()
        final_xml = _volume_xml(f"{PREFIX}{key}.{fmt}", capacity, fmt, "0644")
        final = pool.createXMLFrom(final_xml, temp, 0)
    finally:
        _drop_temp(conn, pool, temp_name)
    cached = _cached(pool, final, image.shown)
    cached.downloaded = True
    return cached


def ensure(
    conn: libvirt.virConnect, image: ImageSpec, progress: Progress | None = None
) -> CachedImage:
    """The image's volume in its pool: the cached one, or fetched now."""
    pool = _pool(conn, image.pool)
    source = fetch.open_source(image.source)
    key = cache_key(image, source.validator)
    with _local_lock(conn.getURI(), image.pool, key):
        pools.refresh(pool)
        found = _find(pool, key)
        if found is not None:
            log.info("image %s: using the cached volume %s", image.shown, found.name())
            return _cached(pool, found, image.shown)
        if image.checksum is None:
            log.warning("image %s has no image_checksum: its content is not verified", image.shown)
        return _fetch(conn, pool, image, source, key, progress)


# ---- listing and deleting ----------------------------------------------------


def _backing_users(conn: libvirt.virConnect) -> dict[str, list[str]]:
    """Image path → the domains whose disks are it or sit on it (one level of
    backing, as salt-kvm's linked clones do)."""
    backing_of: dict[str, str] = {}
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        for vol in pool.listAllVolumes(0):
            with contextlib.suppress(libvirt.libvirtError):
                backing = Volume(vol.XMLDesc(0)).backing_path
                if backing:
                    backing_of[vol.path()] = backing
    users: dict[str, list[str]] = {}
    for dom in conn.listAllDomains(0):
        for disk in Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).disks:
            if disk.path is None:
                continue
            for used in {disk.path, backing_of.get(disk.path, disk.path)}:
                users.setdefault(used, [])
                if dom.name() not in users[used]:
                    users[used].append(dom.name())
    return users


def _pools(conn: libvirt.virConnect, name: str | None) -> list[libvirt.virStoragePool]:
    if name:
        return [_pool(conn, name)]
    return conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)


def list_images(conn: libvirt.virConnect, pool: str | None = None) -> dict[str, dict]:
    """The cached images (and unfinished downloads) with the domains using them."""
    users = _backing_users(conn)
    result = {}
    for pool_obj in _pools(conn, pool):
        pools.refresh(pool_obj)
        for vol in pool_obj.listAllVolumes(0):
            parsed = parse_name(vol.name())
            if parsed is None:
                continue
            _, capacity, allocation = vol.info()
            result[vol.name()] = {
                "pool": pool_obj.name(),
                "path": vol.path(),
                "format": parsed["format"] or volume_format(vol),
                "capacity": capacity,
                "allocation": allocation,
                "key": parsed["key"],
                "complete": parsed["complete"],
                "used_by": sorted(users.get(vol.path(), [])),
            }
    return result


def _drop_temp(conn: libvirt.virConnect, pool: libvirt.virStoragePool, name: str) -> None:
    try:
        chains.delete_volume(conn, pool.storageVolLookupByName(name).path(), "download cleanup")
    except libvirt.libvirtError:
        pass  # never created, or already gone
    except ConflictError as exc:
        log.warning("temporary image volume %s kept: %s", name, exc)


def delete_image(conn: libvirt.virConnect, name: str, pool: str | None = None) -> dict:
    """Delete a cached image (or an unfinished download); refused while any
    domain's disk is it or is backed by it."""
    if parse_name(str(name)) is None:
        raise SpecError("name", f"{name!r} is not an image cache volume", "a name from image_list")
    images = list_images(conn, pool)
    if name not in images:
        where = f" in pool {pool!r}" if pool else ""
        raise NotFoundError(f"no cached image named {name!r}{where}")
    entry = images[name]
    if entry["used_by"]:
        raise ConflictError(
            f"image {name} is used by {', '.join(entry['used_by'])}; destroy those first"
        )
    vol = conn.storagePoolLookupByName(entry["pool"]).storageVolLookupByName(name)
    chains.check_deletable(conn, [vol.path()], f"delete of image {name}")
    vol.delete(0)
    return {"deleted": name, "pool": entry["pool"]}

"""What a backup point is: its manifest, checked field by field, and chains.

A store may sit on a NAS or be a replica, so every manifest goes through one
validator (``parse_manifest``) before anything uses a field of it. A chain is
a full point and the incrementals that follow it; prune removes whole chains.
Pure logic: no file here is opened except by ``sha256_file`` and
``checksum_file``, and /proc/cpuinfo by ``preferred_algorithm``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from salt_kvm.backup.statefiles import FirmwareError, FirmwareState, parse_firmware
from salt_kvm.errors import NotFoundError, SaltKvmError, SpecError

FORMAT = 1
MANIFEST = "manifest.json"
DOMAIN_XML = "domain.xml"
PARTIAL = ".partial-"
LOCK = ".lock"
KIND_FULL = "full"
KIND_INCREMENTAL = "incremental"
# A store may sit on a NAS or be a replica: every manifest field is checked
# against these before anything uses it (``parse_manifest``); \Z, not $, so that a
# trailing newline never passes.
_POINT = r"[0-9]{8}T[0-9]{6}Z(?:-[0-9]{1,6})?"
POINT_RE = re.compile(rf"^{_POINT}\Z")
TARGET_RE = re.compile(r"^(?:vd|sd|hd|xvd)[a-z]{1,3}\Z")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
CHECKPOINT_RE = re.compile(rf"^saltkvm-[0-9a-f]{{8}}-{_POINT}\Z")
CREATED_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z")
IMAGE_FORMAT = "qcow2"
# An image's checksum: a cryptographic digest of its file, in the algorithm the
# manifest names per disk (``algorithm``; absent in older manifests: sha256),
# stored under the algorithm's own key. BLAKE2b is BLAKE2b-512 (``b2sum``).
SHA256, BLAKE2B = "sha256", "blake2b"
DIGEST_RES = {SHA256: SHA256_RE, BLAKE2B: re.compile(r"^[0-9a-f]{128}\Z")}
ALGORITHMS = tuple(DIGEST_RES)
CONSISTENCIES = ("frozen", "crash-consistent", "shut-off")
POINT_METHODS = ("api", "snapshot")
COMPRESSIONS = ("zlib", "zstd")  # qcow2's compression types
LATEST = "latest"


@dataclass
class DiskImage:
    target: str
    file: str
    format: str
    virtual_size: int
    size: int
    sha256: str | None  # the image's digest when ``algorithm`` is sha256 (None otherwise)
    backing: str | None = None
    source: str | None = None
    algorithm: str = SHA256  # which digest of the image file the point records
    blake2b: str | None = None  # the image's digest when ``algorithm`` is blake2b

    @property
    def checksum(self) -> str:
        """The image file's digest, in ``algorithm``."""
        value = getattr(self, self.algorithm) if self.algorithm in DIGEST_RES else None
        if not isinstance(value, str):
            raise SaltKvmError(f"disk {self.target}: no {self.algorithm} digest")
        return value


@dataclass
class Point:
    id: str
    domain: str
    kind: str
    chain: str
    parent: str | None
    checkpoint: str | None
    created: str
    consistency: str
    frozen: bool
    disks: dict[str, DiskImage] = field(default_factory=dict)
    domain_xml_sha256: str | None = None
    duration: float | None = None
    method: str = "api"  # how it was taken: "api" (backup API) or "snapshot" (fallback)
    format: int = FORMAT
    firmware: FirmwareState | None = None  # UEFI variables, TPM state (statefiles)
    # the images' clusters are compressed, in this qcow2 compression type (older
    # manifests name none: not compressed)
    compression: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Point:
        """No checks: for dicts this process made; a manifest from a store is
        read with ``parse_manifest``."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # a newer manifest reads too
        disks = {k: DiskImage(**v) for k, v in (data.pop("disks", None) or {}).items()}
        data["firmware"] = FirmwareState.from_dict(data.get("firmware"))
        return cls(disks=disks, **data)

    @property
    def bytes(self) -> int:
        return sum(d.size for d in self.disks.values())

    def summary(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "chain": self.chain,
            "parent": self.parent,
            "created": self.created,
            "consistency": self.consistency,
            "frozen": self.frozen,
            "method": self.method,
            "compression": self.compression,
            "bytes": self.bytes,
            "disks": sorted(self.disks),
        }


class ManifestError(SaltKvmError):
    """A point's manifest (or a file it names) does not fit the store's layout."""

    def __init__(self, folder: str, key: str, problem: str, accepted: str | None = None):
        self.folder, self.key = folder, key
        message = f"backup point {folder}: {key}: {problem}"
        if accepted:
            message += f" (accepted: {accepted})"
        super().__init__(message)


def image_file(target: str) -> str:
    """The one name a disk's image has in a point's folder."""
    return f"{target}.{IMAGE_FORMAT}"


def image_backing(parent: Point, target: str) -> str:
    """The backing file an incremental's image names: its parent point's image."""
    return f"../{parent.id}/{image_file(target)}"


def _pick(folder: str, data: dict, key: str, check, accepted: str, optional: bool = False):
    value = data.get(key)
    if value is None and optional:
        return None
    if not check(value):
        raise ManifestError(folder, key, f"{value!r} is not valid", accepted)
    return value


def _is(types, pattern=None, choices=None):
    def check(value):
        if isinstance(value, bool) and types is not bool:
            return False
        if not isinstance(value, types):
            return False
        if pattern is not None and not pattern.match(value):
            return False
        return choices is None or value in choices

    return check


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _seconds(value) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def parse_manifest(data: object, folder: str, domain: str) -> Point:
    """The point a manifest describes, every field checked against the store's
    layout: the folder it sits in, the domain asked for, image files named after
    their disk inside the folder, an incremental's backing file its parent's
    image. Raises ``ManifestError`` naming the field; unknown keys are ignored
    (a newer manifest reads too)."""
    if not isinstance(data, dict):
        raise ManifestError(folder, MANIFEST, "is not a JSON object")
    pick = functools.partial(_pick, folder, data)
    fmt = pick("format", _count, str(FORMAT))
    if fmt != FORMAT:
        raise ManifestError(folder, "format", f"{fmt!r} is not a format this version reads", "1")
    pid = pick("id", _is(str, POINT_RE), "the point's folder name")
    if pid != folder:
        raise ManifestError(folder, "id", f"{pid!r} is not the folder's name", folder)
    got = data.get("domain")
    if got != domain:
        raise ManifestError(folder, "domain", f"{got!r} is not the domain asked for", domain)
    kind = pick("kind", _is(str, choices=(KIND_FULL, KIND_INCREMENTAL)), "full, incremental")
    parent = pick("parent", _is(str, POINT_RE), "null or an earlier point id", optional=True)
    chain = pick("chain", _is(str, POINT_RE), "the id of the chain's full point")
    if kind == KIND_FULL and (parent is not None or chain != pid):
        raise ManifestError(
            folder, "parent", "a full point follows no point and starts its chain", "null"
        )
    if kind == KIND_INCREMENTAL and (parent is None or not parent < pid):
        raise ManifestError(folder, "parent", f"{parent!r} is not an earlier point", "a point id")
    if kind == KIND_INCREMENTAL and not chain <= parent:
        raise ManifestError(
            folder, "chain", f"{chain!r} does not start before the parent {parent!r}"
        )
    point = Point(
        id=pid,
        domain=domain,
        kind=kind,
        chain=chain,
        parent=parent,
        checkpoint=pick("checkpoint", _is(str, CHECKPOINT_RE), "saltkvm-<tag>-<id>", True),
        created=pick("created", _is(str, CREATED_RE), "YYYY-MM-DDTHH:MM:SSZ"),
        consistency=pick("consistency", _is(str, choices=CONSISTENCIES), ", ".join(CONSISTENCIES)),
        frozen=pick("frozen", _is(bool), "true, false"),
        domain_xml_sha256=pick("domain_xml_sha256", _is(str, SHA256_RE), "a sha256", True),
        duration=pick("duration", _seconds, "a number of seconds", True),
        method=pick("method", _is(str, choices=POINT_METHODS), ", ".join(POINT_METHODS)),
        compression=pick(
            "compression",
            _is(str, choices=COMPRESSIONS),
            f"null, {', '.join(COMPRESSIONS)}",
            optional=True,
        ),
    )
    disks = data.get("disks")
    if not isinstance(disks, dict) or not disks:
        raise ManifestError(folder, "disks", f"{disks!r} is not a map of disks", "target: image")
    for target, entry in disks.items():
        point.disks[target] = _parse_disk(folder, point, target, entry)
    point.firmware = _parse_firmware(folder, data.get("firmware"))
    return point


def _parse_firmware(folder: str, value: object) -> FirmwareState | None:
    try:
        return parse_firmware(value)
    except FirmwareError as exc:
        raise ManifestError(folder, exc.key, exc.problem, exc.accepted) from exc


def _parse_disk(folder: str, point: Point, target: object, entry: object) -> DiskImage:
    key = f"disks.{target}"
    if not isinstance(target, str) or not TARGET_RE.match(target):
        raise ManifestError(folder, "disks", f"{target!r} is not a disk target", "vda, sdb, ...")
    if not isinstance(entry, dict):
        raise ManifestError(folder, key, "is not a JSON object")
    pick = functools.partial(_pick, folder, {f"{key}.{k}": v for k, v in entry.items()})
    if pick(f"{key}.target", _is(str), target) != target:
        raise ManifestError(folder, f"{key}.target", "is not the disk's key", target)
    name = image_file(target)
    if pick(f"{key}.file", _is(str), name) != name:
        raise ManifestError(
            folder, f"{key}.file", f"{entry['file']!r} is not the disk's image", name
        )
    if pick(f"{key}.format", _is(str), IMAGE_FORMAT) != IMAGE_FORMAT:
        raise ManifestError(
            folder, f"{key}.format", f"{entry['format']!r} is not valid", IMAGE_FORMAT
        )
    backing = pick(f"{key}.backing", _is(str), "the parent point's image", optional=True)
    wanted = f"../{point.parent}/{name}" if point.parent else None
    if backing != wanted:
        raise ManifestError(
            folder,
            f"{key}.backing",
            f"{backing!r} is not the parent point's image",
            wanted or "null (a full point has no backing file)",
        )
    return DiskImage(
        target=target,
        file=name,
        format=IMAGE_FORMAT,
        virtual_size=pick(f"{key}.virtual_size", _count, "a number of bytes"),
        size=pick(f"{key}.size", _count, "a number of bytes"),
        backing=backing,
        source=pick(f"{key}.source", _is(str), "a path", optional=True),
        **_parse_digest(pick, key),
    )


def _parse_digest(pick, key: str) -> dict:
    """A disk's ``algorithm`` (default sha256: older manifests name none) and
    its digest, under the algorithm's key."""
    algorithm = (
        pick(f"{key}.algorithm", _is(str, choices=ALGORITHMS), ", ".join(ALGORITHMS), True)
        or SHA256
    )
    digest = pick(
        f"{key}.{algorithm}", _is(str, DIGEST_RES[algorithm]), f"a {algorithm} in hexadecimal"
    )
    return digest_fields(algorithm, digest)


def digest_fields(algorithm: str, digest: str) -> dict:
    """A ``DiskImage``'s checksum fields for ``digest`` in ``algorithm``."""
    if algorithm not in DIGEST_RES:
        raise SaltKvmError(f"{algorithm!r} is not a checksum algorithm of backups")
    return {"algorithm": algorithm, SHA256: None, BLAKE2B: None, algorithm: digest}


def new_point_id(existing: set[str], now: float | None = None) -> str:
    """A sortable UTC time stamp, suffixed when one already exists this second."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    candidate, n = stamp, 1
    while candidate in existing:
        n += 1
        candidate = f"{stamp}-{n}"
    return candidate


def sha256_file(path: str | Path, chunk: int = 4 * 1024 * 1024) -> str:
    """The checksum of a regular file (never read through a symbolic link)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def new_hash(algorithm: str):
    """A hashlib object of a checksum algorithm of backups."""
    if algorithm == BLAKE2B:
        return hashlib.blake2b()  # BLAKE2b-512, as b2sum prints it
    if algorithm == SHA256:
        return hashlib.sha256()
    raise SaltKvmError(f"{algorithm!r} is not a checksum algorithm of backups")


def checksum_file(path: str | Path, algorithm: str, chunk: int = 4 * 1024 * 1024) -> str:
    """The digest of a regular file (never read through a symbolic link)."""
    digest = new_hash(algorithm)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def algorithm_for_cpu(cpuinfo: str) -> str:
    """The faster of the two for a CPU (``/proc/cpuinfo``): sha256 where the
    CPU has SHA-256 instructions (x86 ``sha_ni``, arm64 ``sha2``), where it runs
    at about twice BLAKE2b's speed; BLAKE2b elsewhere, at about twice sha256's."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features") and {"sha_ni", "sha2"} & set(value.split()):
            return SHA256
    return BLAKE2B


@functools.cache
def preferred_algorithm() -> str:
    """The checksum algorithm new points use on this host."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return algorithm_for_cpu(handle.read())
    except OSError:
        return SHA256


def check_point_ref(value: object, key: str = "point") -> str:
    if value in (None, LATEST):
        return LATEST
    if not isinstance(value, str) or not POINT_RE.fullmatch(value):
        raise SpecError(
            key, f"{value!r} is not a backup point", "latest or an id such as 20261121T041100Z"
        )
    return value


def chains(points: list[Point]) -> list[list[Point]]:
    """Group ``points`` (oldest first) into chains, oldest chain first."""
    by_chain: dict[str, list[Point]] = {}
    for point in sorted(points, key=lambda p: p.id):
        by_chain.setdefault(point.chain, []).append(point)
    return [by_chain[c] for c in sorted(by_chain)]


def chain_to(points: list[Point], point_id: str) -> list[Point]:
    """The points needed to rebuild ``point_id``: its full, then each incremental up to it."""
    by_id = {p.id: p for p in points}
    if point_id not in by_id:
        raise NotFoundError(f"no complete backup point {point_id!r}")
    out = [by_id[point_id]]
    while out[-1].parent is not None:
        parent = by_id.get(out[-1].parent)
        if parent is None:
            raise SaltKvmError(
                f"backup point {out[-1].id} needs {out[-1].parent}, which is missing: "
                "the chain is broken"
            )
        out.append(parent)
    if out[-1].kind != KIND_FULL:
        raise SaltKvmError(f"backup chain of {point_id} does not start with a full backup")
    chain = list(reversed(out))
    for parent, child in zip(chain, chain[1:], strict=False):
        # each image's backing file is its parent's image of the same disk
        if child.chain != chain[0].id or not set(child.disks) <= set(parent.disks):
            raise SaltKvmError(
                f"backup point {child.id} does not follow {parent.id} (chain {child.chain!r}, "
                f"disks {', '.join(sorted(child.disks))} of {', '.join(sorted(parent.disks))})"
            )
    return chain


def check_keep(keep: object, key: str = "keep") -> int:
    """A retention: how many chains (a full and its incrementals) to keep."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise SpecError(key, f"{keep!r} is not a number of chains", "an integer of 1 or more")
    return keep


def prune_plan(points: list[Point], keep: int) -> list[Point]:
    """The points to delete to keep the newest ``keep`` chains: whole chains only."""
    check_keep(keep)
    groups = chains(points)
    return [p for group in groups[: max(0, len(groups) - keep)] for p in group]


DOMAIN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,252}\Z")
MANIFEST_MAX = 1024 * 1024


def check_domain(value: object, key: str = "domain") -> str:
    """A domain's folder below a destination: one plain path component."""
    if not isinstance(value, str) or not DOMAIN_RE.match(value) or value.strip(".") == "":
        raise SpecError(
            key,
            f"{value!r} is not a domain name a backup folder can have",
            "letters, digits, '_', '.', '+', '-', not starting with '.' or '-'",
        )
    return value

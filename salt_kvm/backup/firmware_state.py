"""A guest's UEFI variables (NVRAM) and emulated TPM state in backup points.

Backup (``capture``): the domain's NVRAM file and the files of its swtpm
state folder (``/var/lib/libvirt/swtpm/<uuid>/tpm2/``) are copied into the
point (``nvram.fd``, ``tpm.tpm2_<file>``, 0600) with their checksums in the
manifest's ``firmware`` (``statefiles``). A shut-off guest's files are still;
a running guest's are read after its disks, each whole and twice with the same
bytes (never a torn copy), so they are of a moment a little after the disks'.

Restore (``NvramPlan``, ``TpmPlan``, ``put_back_in_place``): the variables
become the restored domain's own file in the pool, never a file another
domain names; the TPM state goes under the restored UUID only when the
identity is kept (a TPM's secrets are the machine's: a copy under a new UUID
starts with an empty TPM). The store is untrusted: every file is read without
following a link, bounded, and written only when its bytes have the recorded
checksum.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import libvirt

from salt_kvm.backup import statefiles as sf
from salt_kvm.backup import store as bs
from salt_kvm.errors import ConflictError, SaltKvmError
from salt_kvm.virt import chains, firmware
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback

log = logging.getLogger(__name__)

SWTPM_DIR = "/var/lib/libvirt/swtpm"
SWTPM_USER = "tss"  # libvirt's default swtpm_user (qemu.conf)
SETTLE_TRIES = 5


# ---- backup ------------------------------------------------------------------------
def _emulated_tpm(xml: Domain) -> tuple[str, str | None] | None:
    """(TPM version, a custom state folder or None) of an emulated TPM, else None."""
    backend = xml.node.find("devices/tpm/backend")
    if backend is None or backend.get("type") != "emulator":
        return None
    source = backend.find("source")
    custom = source.get("path") if source is not None else None
    return backend.get("version") or "2.0", custom


def tpm_state_dir(uuid: str, version: str) -> Path:
    return Path(SWTPM_DIR) / uuid / ("tpm2" if version == "2.0" else "tpm1.2")


def _read(path: Path, limit: int) -> bytes:
    """A regular file's bytes (``FileNotFoundError`` when missing), at most ``limit``."""
    try:
        return bs.read_no_follow(path, limit)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(str(path)) from exc
        raise SaltKvmError(f"{path} cannot be read for the backup: {exc.strerror}") from exc


def _settled(path: Path, limit: int, live: bool) -> bytes:
    """The file's bytes; of a running guest's file, two reads in a row alike."""
    data = _read(path, limit)
    for _ in range(SETTLE_TRIES if live else 0):
        again = _read(path, limit)
        if again == data:
            return data
        data = again
    if live:
        raise SaltKvmError(f"{path} kept changing while it was read: not backed up, try again")
    return data


def _write_new(path: Path, data: bytes) -> str:
    """A new 0600 file (never through a link, never over one); its sha256."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return hashlib.sha256(data).hexdigest()


def capture(dom: libvirt.virDomain, partial: Path) -> sf.FirmwareState | None:
    """Copy the domain's NVRAM and TPM state into ``partial``; None when it has neither."""
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    live = bool(dom.isActive())
    state = sf.FirmwareState(sf.STATE_CONSISTENCY_SETTLED if live else sf.STATE_CONSISTENCY_OFFLINE)
    nvram = firmware.nvram_path(xml)
    if nvram:
        with contextlib.suppress(FileNotFoundError):  # made at the first start only
            data = _settled(Path(nvram), sf.NVRAM_MAX, live)
            digest = _write_new(partial / sf.NVRAM_FILE, data)
            state.nvram = sf.StateFile(sf.NVRAM_FILE, len(data), digest)
    tpm = _emulated_tpm(xml)
    if tpm is not None and tpm[1]:
        log.warning(
            "%s: the TPM state in %s is not backed up (a custom folder)", dom.name(), tpm[1]
        )
    elif tpm is not None:
        _capture_tpm(dom, tpm[0], state, partial, live)
    if state.nvram is None and not state.tpm:
        return None
    return state


def _capture_tpm(
    dom: libvirt.virDomain, version: str, state: sf.FirmwareState, partial: Path, live: bool
) -> None:
    folder = tpm_state_dir(dom.UUIDString(), version)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return  # swtpm makes it at the first start
    for entry in entries:
        path = f"{folder.name}/{entry.name}"
        if not entry.is_file(follow_symlinks=False) or not sf.TPM_PATH_RE.match(path):
            continue  # swtpm's lock file, anything not a plain file
        if len(state.tpm) == sf.TPM_FILES_MAX:
            raise SaltKvmError(f"{folder} holds more than {sf.TPM_FILES_MAX} files: not backed up")
        with contextlib.suppress(FileNotFoundError):
            data = _settled(Path(entry.path), sf.TPM_FILE_MAX, live)
            name = sf.tpm_file(path)
            state.tpm[path] = sf.StateFile(name, len(data), _write_new(partial / name, data))
    state.tpm_version = version if state.tpm else None


# ---- the store -----------------------------------------------------------------------
def stored_files(point: bs.Point) -> list[tuple[str, str]]:
    """(file name, sha256) of the point's firmware state files."""
    return [(f.file, f.sha256) for f in point.firmware.files()] if point.firmware else []


def problems(store: bs.Store, point: bs.Point, deep: bool = True) -> list[str]:
    """What is wrong with the point's firmware state files (empty when sound)."""
    found = []
    for each in point.firmware.files() if point.firmware else []:
        path = store.path(point) / each.file
        name = f"{point.id}/{each.file}"
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            found.append(f"{name}: missing")
            continue
        if not stat.S_ISREG(info.st_mode):
            found.append(f"{name}: not a regular file (a symbolic link is refused)")
        elif info.st_size != each.size:
            found.append(f"{name}: size {info.st_size} != {each.size}")
        elif deep and bs.sha256_file(path) != each.sha256:
            found.append(f"{name}: checksum mismatch")
    return found


def _checked(store: bs.Store, point: bs.Point, each: sf.StateFile, limit: int) -> bytes:
    """A stored file's bytes, read once, no link followed, with the recorded checksum."""
    try:
        data = bs.read_no_follow(store.path(point) / each.file, limit)
    except OSError as exc:
        raise SaltKvmError(f"{point.id}/{each.file} cannot be read: {exc.strerror}") from exc
    if len(data) != each.size or hashlib.sha256(data).hexdigest() != each.sha256:
        raise SaltKvmError(f"{point.id}/{each.file}: checksum mismatch (refused)")
    return data


# ---- restore as a new domain -----------------------------------------------------------
def _set_nvram(xml: Domain, path: str) -> None:
    os_node = xml.node.find("os")
    node = os_node.find("nvram")
    if node is None:
        node = os_node.makeelement("nvram", {})
        after = os_node.find("loader")
        if after is None:
            after = os_node.find("firmware")
        if after is None:
            after = os_node.find("type")
        after.addnext(node)
    for child in list(node):
        node.remove(child)
    node.attrib.pop("type", None)
    node.text = path


@dataclass
class NvramPlan:
    """The stored UEFI variables as the new domain's own file in its pool."""

    path: str | None = None
    note: str | None = None

    @classmethod
    def make(
        cls, conn: libvirt.virConnect, point: bs.Point, xml: Domain, pool_dir: str, target: str
    ) -> NvramPlan:
        """Checked before anything is written: the file is new and no domain names it."""
        if not point.firmware or not point.firmware.nvram:
            return cls(note="none stored" if firmware.uses_efi(xml) else None)
        if not firmware.uses_efi(xml):
            return cls(note="stored, not restored: the definition has no UEFI firmware")
        path = os.path.join(pool_dir, firmware.nvram_volume_name(target))
        if os.path.lexists(path):
            raise ConflictError(
                f"volume {os.path.basename(path)!r} already exists in the pool: the restored "
                "domain's UEFI variables would overwrite it (refused, nothing written)"
            )
        users = chains.dependents(conn).of(path)
        if users:
            raise ConflictError(
                f"{path} is named by {'; '.join(str(u) for u in users)}: the restored domain's "
                "UEFI variables are never another domain's file (refused, nothing written)"
            )
        return cls(path=path)

    def write(
        self,
        conn: libvirt.virConnect,
        store: bs.Store,
        point: bs.Point,
        xml: Domain,
        rollback: Rollback,
    ) -> None:
        if self.path is None or not point.firmware or not point.firmware.nvram:
            return
        data = _checked(store, point, point.firmware.nvram, sf.NVRAM_MAX)
        path = self.path
        rollback.add(f"NVRAM {path}", lambda: _remove(conn, path))
        _write_new(Path(path), data)
        _set_nvram(xml, path)
        self.note = "restored"


def _remove(conn: libvirt.virConnect, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        chains.delete_file(conn, path, "restore cleanup")


@dataclass
class TpmPlan:
    """The stored TPM state under the restored UUID: with the identity only."""

    folder: Path | None = None
    note: str | None = None

    @classmethod
    def make(cls, point: bs.Point, xml: Domain, keep: bool) -> TpmPlan:
        if not point.firmware or not point.firmware.tpm:
            return cls(note="none stored" if _emulated_tpm(xml) else None)
        tpm = _emulated_tpm(xml)
        if tpm is None or tpm[1]:
            return cls(note="stored, not restored: the definition has no emulated TPM of its own")
        if not keep:
            return cls(note="not copied: a new identity starts with an empty TPM")
        if tpm[0] != point.firmware.tpm_version:
            return cls(note=f"stored, not restored: TPM {point.firmware.tpm_version}, not {tpm[0]}")
        folder = tpm_state_dir(str(xml.uuid), tpm[0])
        if os.path.lexists(folder.parent):
            raise ConflictError(
                f"{folder.parent} exists: the TPM state of UUID {xml.uuid} is there already "
                "(refused, nothing written; remove it or restore with new_identity=True)"
            )
        return cls(folder=folder)

    def write(self, store: bs.Store, point: bs.Point, rollback: Rollback) -> None:
        if self.folder is None or not point.firmware:
            return
        files = {
            path: _checked(store, point, each, sf.TPM_FILE_MAX)
            for path, each in point.firmware.tpm.items()
        }
        top = self.folder.parent
        os.makedirs(SWTPM_DIR, 0o711, exist_ok=True)
        os.mkdir(top, 0o711)  # as libvirt makes it; refused if it appeared meanwhile
        rollback.add(f"TPM state {top}", lambda: shutil.rmtree(top, ignore_errors=True))
        os.chmod(top, 0o711)
        os.mkdir(self.folder, 0o700)
        owner = _swtpm_owner()
        for path, data in sorted(files.items()):
            target = top / path
            _write_new(target, data)
            os.chown(target, *owner)
        os.chown(self.folder, *owner)
        self.note = "restored"


def _swtpm_owner() -> tuple[int, int]:
    """The user swtpm runs as (libvirt's default, tss), else root."""
    try:
        user = pwd.getpwnam(SWTPM_USER)
        return user.pw_uid, user.pw_gid
    except KeyError:
        return 0, 0


# ---- restore in place -----------------------------------------------------------------
@dataclass
class InPlacePlan:
    """The stored state put back over a shut-off domain's own files: written
    beside them (``write``) with the disks, renamed over them (``commit``) once
    every disk is written, or removed (``discard``)."""

    files: list[tuple[Path, bytes, tuple[int, int, int]]]  # final path, bytes, uid gid mode
    notes: dict[str, str]
    made: Path | None = None  # the TPM state folder of a domain that has none yet

    @classmethod
    def make(
        cls, store: bs.Store, point: bs.Point, dom: libvirt.virDomain, xml: Domain
    ) -> InPlacePlan:
        """Checked and read before anything is written."""
        plan = cls([], {})
        state = point.firmware
        if state is None:
            return plan
        if state.nvram:
            plan._nvram(store, point, dom, xml)
        if state.tpm:
            plan._tpm(store, point, dom, xml)
        return plan

    def _nvram(self, store, point: bs.Point, dom: libvirt.virDomain, xml: Domain) -> None:
        from salt_kvm.virt.lifecycle import nvram_is_own

        path = firmware.nvram_path(xml)
        if not path:
            self.notes["nvram"] = "stored, not restored: the domain names no NVRAM file"
            return
        if not nvram_is_own(dom):  # another domain's, or a file salt-kvm did not make
            self.notes["nvram"] = f"stored, not restored: {path} is not the domain's own file"
            return
        assert point.firmware and point.firmware.nvram
        data = _checked(store, point, point.firmware.nvram, sf.NVRAM_MAX)
        self.files.append((Path(path), data, _owner_mode(Path(path), (0, 0, 0o600))))
        self.notes["nvram"] = "restored"

    def _tpm(self, store, point: bs.Point, dom: libvirt.virDomain, xml: Domain) -> None:
        assert point.firmware
        tpm = _emulated_tpm(xml)
        stored = Domain(bs.read_no_follow(store.path(point) / bs.DOMAIN_XML, 4 * 1024 * 1024))
        if tpm is None or tpm[1] or tpm[0] != point.firmware.tpm_version:
            self.notes["tpm_state"] = "stored, not restored: the domain has no such emulated TPM"
            return
        if str(stored.uuid) != dom.UUIDString():
            self.notes["tpm_state"] = "not restored: the domain's UUID is not the backed-up one"
            return
        folder = tpm_state_dir(dom.UUIDString(), tpm[0])
        if not os.path.lexists(folder.parent):
            self.made = folder.parent
        owner = (*_swtpm_owner(), 0o600)
        for path, each in sorted(point.firmware.tpm.items()):
            data = _checked(store, point, each, sf.TPM_FILE_MAX)
            final = folder.parent / path
            self.files.append((final, data, _owner_mode(final, owner)))
        self.notes["tpm_state"] = "restored"

    def write(self) -> None:
        if self.made is not None:
            os.makedirs(SWTPM_DIR, 0o711, exist_ok=True)
            os.mkdir(self.made, 0o711)
            os.chmod(self.made, 0o711)
        for path, data, (uid, gid, mode) in self.files:
            if self.made is not None and not path.parent.exists():
                os.mkdir(path.parent, 0o700)  # the version folder, swtpm's
                os.chown(path.parent, uid, gid)
            temp = _temp(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)  # a killed restore's
            _write_new(temp, data)
            os.chown(temp, uid, gid)
            os.chmod(temp, mode)

    def commit(self) -> None:
        for path, _, _ in self.files:
            os.replace(_temp(path), path)

    def discard(self) -> None:
        for path, _, _ in self.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_temp(path))
        if self.made is not None:
            shutil.rmtree(self.made, ignore_errors=True)


def _temp(path: Path) -> Path:
    return path.with_name(f"{path.name}.restore-tmp")


def _owner_mode(path: Path, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """The owner and mode of the file a restore replaces (``default`` when missing);
    never a link: it is replaced, not written through."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return default
    if not stat.S_ISREG(info.st_mode):
        raise SaltKvmError(f"{path} is not a regular file: not replaced by a restore")
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode) & 0o600 or 0o600

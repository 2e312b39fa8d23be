"""A point's firmware state: the guest's UEFI variables (NVRAM) and its
emulated TPM's state, as the manifest records them.

Optional (a manifest of an older version has none, and a BIOS guest without a
TPM stores none). The store is untrusted: every name, size and checksum is
checked here (``parse_firmware``) before a file is opened, and a stored file
always has one of the names made by ``nvram_file``/``tpm_file``: a plain name
in the point's folder, never a path. Pure logic.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

NVRAM_FILE = "nvram.fd"
TPM_PREFIX = "tpm."
# An NVRAM file is a flash image of a few MiB; a TPM 2.0 state (swtpm's
# permall) a few dozen KiB. Anything far larger is refused, not read.
NVRAM_MAX = 64 * 1024 * 1024
TPM_FILE_MAX = 4 * 1024 * 1024
TPM_FILES_MAX = 16
TPM_VERSIONS = ("2.0", "1.2")
# A file of swtpm's state folder (/var/lib/libvirt/swtpm/<uuid>/): one
# version folder, one plain file name in it (no dot first: no "." or "..").
TPM_PATH_RE = re.compile(r"^tpm(?:2|1\.2)/[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}\Z")
STATE_CONSISTENCY_OFFLINE = "shut-off"
# Running guest: each file read whole twice in a row with the same bytes
# (never torn), after the disks were copied (not at their instant).
STATE_CONSISTENCY_SETTLED = "settled"
STATE_CONSISTENCIES = (STATE_CONSISTENCY_OFFLINE, STATE_CONSISTENCY_SETTLED)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass
class StateFile:
    file: str  # its name in the point's folder
    size: int
    sha256: str


@dataclass
class FirmwareState:
    consistency: str
    nvram: StateFile | None = None
    tpm_version: str | None = None
    # path below the swtpm state folder (tpm2/tpm2-00.permall) -> its copy
    tpm: dict[str, StateFile] = field(default_factory=dict)

    def files(self) -> list[StateFile]:
        return ([self.nvram] if self.nvram else []) + [self.tpm[k] for k in sorted(self.tpm)]

    @classmethod
    def from_dict(cls, data: dict | None) -> FirmwareState | None:
        """No checks: for dicts this process made (``parse_firmware`` for a store's)."""
        if not data:
            return None
        nvram = StateFile(**data["nvram"]) if data.get("nvram") else None
        tpm = {k: StateFile(**v) for k, v in (data.get("tpm") or {}).items()}
        return cls(data["consistency"], nvram, data.get("tpm_version"), tpm)


def tpm_file(path: str) -> str:
    """The one name a file of the TPM's state has in a point's folder."""
    return TPM_PREFIX + path.replace("/", "_")


class FirmwareError(ValueError):
    """A ``firmware`` field of a manifest that does not fit (key, problem, accepted)."""

    def __init__(self, key: str, problem: str, accepted: str | None = None):
        self.key, self.problem, self.accepted = key, problem, accepted
        super().__init__(f"{key}: {problem}")


def _count(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _state_file(key: str, entry: object, name: str, limit: int) -> StateFile:
    if not isinstance(entry, dict):
        raise FirmwareError(key, f"{entry!r} is not a JSON object", "file, size, sha256")
    if entry.get("file") != name:
        raise FirmwareError(f"{key}.file", f"{entry.get('file')!r} is not valid", name)
    size = entry.get("size")
    if not isinstance(size, int) or not _count(size, limit):
        raise FirmwareError(f"{key}.size", f"{size!r} is not valid", f"0 to {limit} bytes")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256_RE.match(digest):
        raise FirmwareError(f"{key}.sha256", f"{digest!r} is not valid", "a sha256 in hexadecimal")
    return StateFile(name, size, digest)


def parse_firmware(data: object) -> FirmwareState | None:
    """The firmware state a manifest's ``firmware`` value describes (``None``
    when absent), every field checked; raises ``FirmwareError`` naming it."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise FirmwareError("firmware", f"{data!r} is not a JSON object", "consistency, nvram, tpm")
    consistency = data.get("consistency")
    if consistency not in STATE_CONSISTENCIES:
        raise FirmwareError(
            "firmware.consistency", f"{consistency!r} is not valid", ", ".join(STATE_CONSISTENCIES)
        )
    state = FirmwareState(consistency)
    if data.get("nvram") is not None:
        state.nvram = _state_file("firmware.nvram", data["nvram"], NVRAM_FILE, NVRAM_MAX)
    tpm = data.get("tpm")
    if tpm is None:
        return state
    version = data.get("tpm_version")
    if version not in TPM_VERSIONS:
        raise FirmwareError(
            "firmware.tpm_version", f"{version!r} is not valid", ", ".join(TPM_VERSIONS)
        )
    if not isinstance(tpm, dict) or not 0 < len(tpm) <= TPM_FILES_MAX:
        raise FirmwareError(
            "firmware.tpm", "is not a map of files", f"1 to {TPM_FILES_MAX} files of swtpm's state"
        )
    state.tpm_version = version
    parse = functools.partial(_state_file, limit=TPM_FILE_MAX)
    for path, entry in tpm.items():
        if not isinstance(path, str) or not TPM_PATH_RE.match(path):
            raise FirmwareError(
                "firmware.tpm", f"{path!r} is not a file of swtpm's state", "tpm2/<file name>"
            )
        state.tpm[path] = parse(f"firmware.tpm.{path}", entry, tpm_file(path))
    return state

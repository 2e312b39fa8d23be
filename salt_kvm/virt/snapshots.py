"""Snapshots, checkpoints and backup jobs: the documents of libvirt's
``snapshotCreateXML``, ``checkpointCreateXML`` and ``backupBegin``."""

from __future__ import annotations

from salt_kvm.virt.xmlmodel import XMLChildren, XMLObject, XMLProperty

NO = "no"


class SnapshotDisk(XMLObject):
    """What a snapshot does with one disk: ``snapshot`` is ``external``
    (an overlay at ``source_file``), ``internal`` or ``no``."""

    TAG = "disk"

    name = XMLProperty("./@name")
    snapshot = XMLProperty("./@snapshot")
    driver_type = XMLProperty("./driver/@type")
    source_file = XMLProperty("./source/@file")


class DomainSnapshot(XMLObject):
    """A domain snapshot (as virt-manager's ``DomainSnapshot``)."""

    TAG = "domainsnapshot"
    EXTERNAL = "external"
    INTERNAL = "internal"

    name = XMLProperty("./name")
    description = XMLProperty("./description")
    memory_snapshot = XMLProperty("./memory/@snapshot")
    # Read only: libvirt's own fields.
    state = XMLProperty("./state")
    creation_time = XMLProperty("./creationTime", int)
    parent = XMLProperty("./parent/name")
    disks = XMLChildren(SnapshotDisk, "./disks/disk")

    @classmethod
    def new(cls, name: str, description: str | None = None) -> DomainSnapshot:
        snap = cls()
        snap.name = name
        snap.description = description or None
        return snap

    def add_overlay(self, target: str, overlay: str, fmt: str = "qcow2") -> SnapshotDisk:
        """Disk ``target`` gets an external overlay at ``overlay``."""
        return self.disks.add(
            name=target, snapshot=self.EXTERNAL, driver_type=fmt, source_file=overlay
        )

    def skip_disk(self, target: str) -> SnapshotDisk:
        return self.disks.add(name=target, snapshot=NO)

    @property
    def external(self) -> bool:
        """Whether any disk, or the memory, went to an external file."""
        return self.memory_snapshot == self.EXTERNAL or any(
            d.snapshot == self.EXTERNAL for d in self.disks
        )

    def overlays(self) -> dict[str, str]:
        """Disk target -> its external overlay."""
        return {
            d.name: d.source_file
            for d in self.disks
            if d.snapshot == self.EXTERNAL and d.source_file is not None
        }


class CheckpointDisk(XMLObject):
    """Whether a checkpoint tracks one disk: ``checkpoint`` is ``bitmap`` or ``no``."""

    TAG = "disk"

    name = XMLProperty("./@name")
    checkpoint = XMLProperty("./@checkpoint")
    bitmap = XMLProperty("./@bitmap")


class Checkpoint(XMLObject):
    """A domain checkpoint: where the next incremental backup starts from."""

    TAG = "domaincheckpoint"
    BITMAP = "bitmap"

    name = XMLProperty("./name")
    description = XMLProperty("./description")
    parent = XMLProperty("./parent/name")
    creation_time = XMLProperty("./creationTime", int)
    disks = XMLChildren(CheckpointDisk, "./disks/disk")

    @classmethod
    def new(cls, name: str, tracked: list[str], every: list[str]) -> Checkpoint:
        """A checkpoint with a bitmap on the ``tracked`` disks; the others of
        ``every`` (all the domain's disks, in order) say ``no``."""
        cp = cls()
        cp.name = name
        cp.node.append(cp.node.makeelement("disks"))
        for target in every:
            cp.disks.add(name=target, checkpoint=cls.BITMAP if target in tracked else NO)
        return cp


class BackupDisk(XMLObject):
    """One disk of a backup job; a push backup writes it to ``target_file``, a
    pull backup exports it as ``exportname`` (an incremental's changed blocks as
    the dirty bitmap ``exportbitmap``), keeping the guest's new writes apart in
    ``scratch_file`` meanwhile."""

    TAG = "disk"

    name = XMLProperty("./@name")
    backup = XMLProperty("./@backup")
    type = XMLProperty("./@type")
    exportname = XMLProperty("./@exportname")
    exportbitmap = XMLProperty("./@exportbitmap")
    target_file = XMLProperty("./target/@file")
    scratch_file = XMLProperty("./scratch/@file")
    driver_type = XMLProperty("./driver/@type")


class BackupJob(XMLObject):
    """A ``<domainbackup>`` (``virDomainBackupBegin``)."""

    TAG = "domainbackup"
    MODE_PUSH = "push"
    MODE_PULL = "pull"

    mode = XMLProperty("./@mode")
    incremental = XMLProperty("./incremental")
    server_transport = XMLProperty("./server/@transport")
    server_socket = XMLProperty("./server/@socket")
    disks = XMLChildren(BackupDisk, "./disks/disk")

    @classmethod
    def push(cls, incremental: str | None = None) -> BackupJob:
        """A push backup, incremental since checkpoint ``incremental`` if given."""
        job = cls()
        job.mode = cls.MODE_PUSH
        job.incremental = incremental or None
        job.node.append(job.node.makeelement("disks"))
        return job

    @classmethod
    def pull(cls, socket: str, incremental: str | None = None) -> BackupJob:
        """A pull backup served by QEMU's NBD server on the unix socket ``socket``."""
        job = cls()
        job.mode = cls.MODE_PULL
        job.incremental = incremental or None
        job.server_transport = "unix"
        job.server_socket = socket
        job.node.append(job.node.makeelement("disks"))
        return job

    def add_export(self, target: str, export: str, bitmap: str | None, scratch: str) -> BackupDisk:
        """Disk ``target`` is exported as ``export`` (with dirty bitmap ``bitmap``)."""
        return self.disks.add(
            name=target,
            backup="yes",
            type="file",
            exportname=export,
            exportbitmap=bitmap,
            scratch_file=scratch,
        )

    def add_file(self, target: str, path: str, fmt: str = "qcow2") -> BackupDisk:
        """Disk ``target`` is written to the file ``path``."""
        return self.disks.add(
            name=target, backup="yes", type="file", target_file=path, driver_type=fmt
        )

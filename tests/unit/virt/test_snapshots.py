"""Snapshot, checkpoint and backup job documents."""

from salt_kvm.virt.snapshots import BackupJob, Checkpoint, DomainSnapshot
from tests.xmlcompare import assert_same_xml

# virDomainSnapshot.getXMLDesc of an external disk-only snapshot (the domain trimmed).
LIBVIRT_SNAPSHOT = """
<domainsnapshot>
  <name>before-upgrade</name>
  <description>kernel 6.1</description>
  <state>disk-snapshot</state>
  <parent>
    <name>first</name>
  </parent>
  <creationTime>1796064630</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/pool/vm.before-upgrade.qcow2'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
  <domain type='kvm'>
    <name>vm</name>
  </domain>
</domainsnapshot>
"""

LIBVIRT_CHECKPOINT = """
<domaincheckpoint>
  <name>saltkvm-0123abcd-20261121T041100Z</name>
  <creationTime>1796064630</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='saltkvm-0123abcd-20261121T041100Z'/>
    <disk name='sda' checkpoint='no'/>
  </disks>
  <domain type='kvm'>
    <name>vm</name>
  </domain>
</domaincheckpoint>
"""


def test_external_snapshot():
    snap = DomainSnapshot.new("s1", "why")
    snap.memory_snapshot = "no"
    snap.add_overlay("vda", "/pool/vm.s1.qcow2")
    snap.skip_disk("sda")
    assert_same_xml(
        snap.to_xml(),
        """<domainsnapshot><name>s1</name><description>why</description>
        <memory snapshot="no"/><disks>
        <disk name="vda" snapshot="external"><driver type="qcow2"/>
        <source file="/pool/vm.s1.qcow2"/></disk>
        <disk name="sda" snapshot="no"/></disks></domainsnapshot>""",
    )


def test_internal_snapshot_without_description():
    for empty in (None, ""):
        assert_same_xml(
            DomainSnapshot.new("s2", empty).to_xml(),
            "<domainsnapshot><name>s2</name></domainsnapshot>",
        )


def test_reads_libvirts_snapshot():
    snap = DomainSnapshot(LIBVIRT_SNAPSHOT)
    assert (snap.name, snap.description, snap.state) == (
        "before-upgrade",
        "kernel 6.1",
        "disk-snapshot",
    )
    assert (snap.parent, snap.creation_time) == ("first", 1796064630)
    assert snap.external
    assert snap.overlays() == {"vda": "/pool/vm.before-upgrade.qcow2"}
    assert [(d.name, d.snapshot) for d in snap.disks] == [("vda", "external"), ("vdb", "no")]
    assert_same_xml(DomainSnapshot(snap.to_xml()).to_xml(), LIBVIRT_SNAPSHOT)


def test_internal_snapshot_is_not_external():
    snap = DomainSnapshot(
        "<domainsnapshot><name>i</name><memory snapshot='internal'/>"
        "<disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>"
    )
    assert not snap.external
    assert snap.overlays() == {}
    assert DomainSnapshot("<domainsnapshot><memory snapshot='external'/></domainsnapshot>").external


def test_checkpoint_tracks_the_chosen_disks_and_names_the_others():
    cp = Checkpoint.new("cp1", ["vda"], ["vda", "sda", "vdb"])
    assert_same_xml(
        cp.to_xml(),
        """<domaincheckpoint><name>cp1</name><disks>
        <disk name="vda" checkpoint="bitmap"/><disk name="sda" checkpoint="no"/>
        <disk name="vdb" checkpoint="no"/></disks></domaincheckpoint>""",
    )


def test_reads_libvirts_checkpoint():
    cp = Checkpoint(LIBVIRT_CHECKPOINT)
    assert cp.name == "saltkvm-0123abcd-20261121T041100Z"
    assert [(d.name, d.checkpoint, d.bitmap) for d in cp.disks] == [
        ("vda", "bitmap", "saltkvm-0123abcd-20261121T041100Z"),
        ("sda", "no", None),
    ]
    assert_same_xml(Checkpoint(cp.to_xml()).to_xml(), LIBVIRT_CHECKPOINT)


def test_full_and_incremental_push_backups():
    full = BackupJob.push()
    full.add_file("vda", "/dest/vm/.partial-x/vda.qcow2")
    assert_same_xml(
        full.to_xml(),
        """<domainbackup mode="push"><disks>
        <disk name="vda" backup="yes" type="file">
        <target file="/dest/vm/.partial-x/vda.qcow2"/><driver type="qcow2"/></disk>
        </disks></domainbackup>""",
    )
    inc = BackupJob.push("cp1")
    assert_same_xml(
        inc.to_xml(),
        '<domainbackup mode="push"><incremental>cp1</incremental><disks/></domainbackup>',
    )
    read = BackupJob(full.to_xml())
    assert (read.mode, read.incremental) == ("push", None)
    assert [(d.name, d.target_file, d.driver_type) for d in read.disks] == [
        ("vda", "/dest/vm/.partial-x/vda.qcow2", "qcow2")
    ]


def test_full_and_incremental_pull_backups():
    full = BackupJob.pull("/var/tmp/x/nbd.sock")
    full.add_export("vda", "vda", None, "/var/tmp/x/vda.scratch")
    assert_same_xml(
        full.to_xml(),
        """<domainbackup mode="pull"><server transport="unix" socket="/var/tmp/x/nbd.sock"/>
        <disks><disk name="vda" backup="yes" type="file" exportname="vda">
        <scratch file="/var/tmp/x/vda.scratch"/></disk></disks></domainbackup>""",
    )
    inc = BackupJob.pull("/s", "cp1")
    inc.add_export("vdb", "vdb", "backup-vdb", "/vdb.scratch")
    read = BackupJob(inc.to_xml())
    assert (read.mode, read.incremental, read.server_socket) == ("pull", "cp1", "/s")
    assert [(d.name, d.exportname, d.exportbitmap, d.scratch_file) for d in read.disks] == [
        ("vdb", "vdb", "backup-vdb", "/vdb.scratch")
    ]

"""Complete backup points in a real store, as a backup run would leave them."""

import hashlib
import subprocess

from salt_kvm.backup import store as bs


def commit(store, pid, parent=None, chain=None, algorithm=bs.SHA256):
    """A complete point with a real (small) qcow2, as a backup would leave it
    (its image's checksum in ``algorithm``)."""
    partial = store.begin(pid)
    image = partial / "vda.qcow2"
    backing = ["-b", f"../{parent}/vda.qcow2", "-F", "qcow2"] if parent else []
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(image), "1M"], check=True
    )
    data = image.read_bytes()
    (partial / bs.DOMAIN_XML).write_text("<domain/>")
    point = bs.Point(
        id=pid,
        domain=store.domain,
        kind=bs.KIND_INCREMENTAL if parent else bs.KIND_FULL,
        chain=chain or pid,
        parent=parent,
        checkpoint=None,
        created="2026-01-01T00:00:00Z",
        consistency="crash-consistent",
        frozen=False,
        disks={
            "vda": bs.DiskImage(
                "vda",
                "vda.qcow2",
                "qcow2",
                1 << 20,
                len(data),
                backing=f"../{parent}/vda.qcow2" if parent else None,
                **bs.digest_fields(algorithm, hashlib.new(algorithm, data).hexdigest()),
            )
        },
        domain_xml_sha256=hashlib.sha256(b"<domain/>").hexdigest(),
    )
    store.commit(partial, point)

"""Integration tier: real libvirtd, booted guests, real Salt commands.

Nothing here skips: when the test bed is missing, the tests fail and say how
to build it (scripts/run-tests does).
"""

import contextlib
import os
import subprocess
import tempfile
import uuid

import libvirt
import pytest

from salt_kvm.errors import ConflictError, SaltKvmError
from salt_kvm.virt import (  # noqa: F401 - connection: libvirt stderr
    chains,
    connection,
    lifecycle,
    pools,
)
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.snapshots import DomainSnapshot

from . import saltenv

URI = "qemu:///system"
BASE = os.environ.get("SALT_KVM_BASE_DOMAIN", "salt-kvm-base-debian12")
NETWORK = os.environ.get("SALT_KVM_TEST_NET", "salt-kvm-test")
POOL = os.environ.get("SALT_KVM_POOL", "default")
IMAGES = "/var/lib/libvirt/images"  # the pool's folder (scripts/setup-host makes it)
GUEST_USER, GUEST_PASSWORD = "root", "salt-kvm"
# Every guest (and so every volume) the tests make is named PREFIX*; a worktree
# running the tier beside another sets its own prefix and port base.
PREFIX = os.environ.get("SALT_KVM_TEST_PREFIX", "skt-")
HOW = "build the test bed first: scripts/run-tests"


def unique(stem: str) -> str:
    return f"{PREFIX}{stem}-{uuid.uuid4().hex[:6]}"


def backup_dest(stem: str) -> str:
    """A backup destination folder (traversable, as restores that put a
    domain on a point's image need; the backup itself writes as root)."""
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{stem}-", dir="/var/tmp")
    os.chmod(path, 0o711)
    return path


@pytest.fixture(scope="session")
def hv():
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd does not answer on {URI}: {exc}; {HOW}")
    remove_leftovers(conn)
    yield conn
    # What failed tests left: a running guest would also stop run-tests from
    # switching libvirt between its tiers.
    try:
        with connection.connected(URI) as fresh:
            remove_leftovers(fresh)
    except (libvirt.libvirtError, SaltKvmError) as exc:
        print(f"\nleft behind by failed tests, not removed: {exc}")
    conn.close()


def remove_leftovers(conn, prefix=PREFIX):
    """Guests an interrupted earlier run left behind (named ``prefix``*, with
    salt-kvm's metadata), whatever their snapshots and checkpoints; a guest
    another one is a quick clone of goes after that one (refused before)."""
    left = [
        dom.name()
        for dom in conn.listAllDomains(0)
        if dom.name().startswith(prefix) and Domain(dom.XMLDesc(0)).managed_info() is not None
    ]
    while left:
        refused = []
        for name in left:
            try:
                _sweep(conn, name, prefix)
            except ConflictError:
                refused.append(name)
        if len(refused) == len(left):
            _sweep(conn, refused[0], prefix)  # raises: something else needs it
        left = refused


def _owned_files(deps, dom, prefix):
    """The files a leftover guest owns: the volumes and seed its salt-kvm
    metadata records, and the files of its disks' chains and snapshots named
    ``prefix``* (its snapshot overlays); never the base it stands on."""
    info = Domain(dom.XMLDesc(0)).managed_info() or {}
    recorded = [*(info.get("volumes") or []), *([info["seed"]] if info.get("seed") else [])]
    found = list(deps.files_of.get(dom.name(), set()))
    for snap in dom.listAllSnapshots(0):
        found += DomainSnapshot(snap.getXMLDesc(0)).overlays().values()
    return sorted({*recorded, *(p for p in found if os.path.basename(p).startswith(prefix))})


def _sweep(conn, name, prefix):
    """Remove one leftover guest: snapshot and checkpoint metadata only (a merge
    or a revert of a half-made guest is pointless and libvirt may refuse it),
    then the files it owns that nothing else needs. Refused (ConflictError),
    nothing changed, while something else stands on one of them."""
    dom = conn.lookupByName(name)
    deps = chains.dependents(conn)
    owned = _owned_files(deps, dom, prefix)
    blocked = deps.blocking(owned, domains=(name,), chains_of=(name,))
    if blocked:
        raise ConflictError(f"leftover {name}: {chains.describe(blocked)} needs its files")
    lifecycle.undefine(dom)  # stops it; takes snapshot and checkpoint metadata with it
    doomed, kept = chains.dependents(conn).deletable(owned)  # again: without the guest
    for path in doomed:
        try:
            conn.storageVolLookupByPath(path).delete(0)
        except libvirt.libvirtError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a file no pool lists


@pytest.fixture(scope="session")
def hv2(hv):
    """The test bed's second hypervisor (scripts/second-hypervisor: started when
    it does not run, with its pool, bridged network and base domain) and a
    connection to it; what an interrupted run left there is removed first."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "second-hypervisor")
    proc = subprocess.run([script], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"scripts/second-hypervisor failed: {proc.stderr[-3000:]}")
    uri = proc.stdout.strip().splitlines()[-1]
    conn = libvirt.open(uri)
    remove_leftovers(conn)
    yield uri, conn
    try:
        remove_leftovers(conn)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def base_domain(hv):
    try:
        dom = hv.lookupByName(BASE)
    except libvirt.libvirtError:
        pytest.fail(f"base domain {BASE!r} does not exist; {HOW}")
    assert not dom.isActive(), f"base domain {BASE} must be shut off"
    return BASE


@pytest.fixture(scope="module")
def salt(tmp_path_factory, hv):
    """A salt-master with the test provider, one per module (each module's
    profiles and minions are its own)."""
    env = saltenv.start_master(tmp_path_factory.mktemp("salt"))
    env.write_providers(saltenv.provider())
    yield env
    saltenv.stop_master(env)


def prefixed_domains(conn) -> set[str]:
    """The domains named PREFIX* (this process's: another stream's change under theirs)."""
    return {d.name() for d in conn.listAllDomains(0) if d.name().startswith(PREFIX)}


def prefixed_volumes(conn) -> set[str]:
    """The test pool's volumes named PREFIX* (what this run's guests made)."""
    pool = conn.storagePoolLookupByName(POOL)
    pools.refresh(pool)
    return {v for v in pool.listVolumes() if v.startswith(PREFIX)}


@pytest.fixture
def pool_volumes(hv):
    return lambda: prefixed_volumes(hv)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by marker
def pytest_collection_modifyitems(config, items):
    """Modules that restart libvirtd run last (whole, in their own order): every
    libvirt connection open at that moment, like the session's ``hv``, dies. The
    whole module is ``exclusive`` too: scripts/run-integration runs such tests
    alone, after its parallel streams (a restart would cut theirs), and the
    module's other tests share its fixtures (booted guests)."""
    restarting = {item.module for item in items if item.get_closest_marker("restarts_libvirtd")}
    for item in items:
        if item.module in restarting:
            item.add_marker(pytest.mark.exclusive)
    items.sort(key=lambda item: item.module in restarting)

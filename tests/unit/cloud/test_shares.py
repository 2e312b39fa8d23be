"""shares: and share_allowed_dirs: parsing, the path rule on the host's
directories, the daemon checks, the domain XML and the guest's mount config."""

import json
import os
import stat

import pytest

from salt_kvm.cloud import deploy, shares
from salt_kvm.cloud.shares import ShareSpec, check_source
from salt_kvm.cloud.spec import build_spec, check_written_keys
from salt_kvm.errors import SpecError
from salt_kvm.virt import virtiofs
from salt_kvm.virt.domain import Domain, new_domain

MINIMAL = {"name": "vm1", "base_domain": "base", "password": "pw"}


def spec(**values):
    return build_spec({**MINIMAL, **values})


def refused(key: str, **values) -> SpecError:
    with pytest.raises(SpecError) as err:
        spec(**values)
    assert err.value.key == key, str(err.value)
    assert err.value.accepted, str(err.value)
    return err.value


# ---- parsing ------------------------------------------------------------------


def test_a_share_is_parsed_with_its_defaults():
    s = spec(
        shares=[{"source": "/srv/shares/data/", "tag": "data", "mount": "/mnt/data/"}],
        share_allowed_dirs=["/srv/shares"],
    )
    assert s.shares == (ShareSpec("/srv/shares/data", "data", False, "/mnt/data"),)
    assert s.share_allowed_dirs == ("/srv/shares",)
    assert spec().shares == ()


def test_no_allowed_dirs_refuses_any_share_naming_the_key():
    err = refused("shares[0].source", shares=[{"source": "/srv/x", "tag": "x"}])
    assert "share_allowed_dirs" in str(err)


def test_share_allowed_dirs_is_the_providers_not_the_profiles():
    with pytest.raises(SpecError) as err:
        check_written_keys({"share_allowed_dirs": ["/"]}, {})
    assert err.value.key == "share_allowed_dirs"
    check_written_keys({"shares": []}, {"share_allowed_dirs": ["/srv"]})


@pytest.mark.parametrize(
    ("share", "key"),
    [
        ({"source": "/etc", "tag": "x"}, "shares[0].source"),  # outside, as written
        ({"source": "/srv/shares/../../etc", "tag": "x"}, "shares[0].source"),
        ({"source": "relative/dir", "tag": "x"}, "shares[0].source"),
        ({"source": "/srv/shares/a", "tag": "bad tag"}, "shares[0].tag"),
        ({"source": "/srv/shares/a", "tag": "t" * 37}, "shares[0].tag"),
        ({"source": "/srv/shares/a", "tag": "-x"}, "shares[0].tag"),
        ({"source": "/srv/shares/a"}, "shares[0].tag"),
        ({"tag": "x"}, "shares[0].source"),
        ({"source": "/srv/shares/a", "tag": "x", "mount": "mnt"}, "shares[0].mount"),
        ({"source": "/srv/shares/a", "tag": "x", "mount": "/mnt/a b"}, "shares[0].mount"),
        ({"source": "/srv/shares/a", "tag": "x", "mount": "/mnt/../etc"}, "shares[0].mount"),
        ({"source": "/srv/shares/a", "tag": "x", "mount": "/etc"}, "shares[0].mount"),
        ({"source": "/srv/shares/a", "tag": "x", "mount": "/"}, "shares[0].mount"),
        ({"source": "/srv/shares/a", "tag": "x", "readonly": "maybe"}, "shares[0].readonly"),
        ({"source": "/srv/shares/a", "tag": "x", "mode": "rw"}, "shares[0]"),
        ("/srv/shares/a", "shares[0]"),
    ],
)
def test_bad_shares_are_refused_by_name(share, key):
    refused(key, shares=[share], share_allowed_dirs=["/srv/shares"])


def test_tags_and_mounts_are_unique():
    dirs = ["/srv/shares"]
    a = {"source": "/srv/shares/a", "tag": "a", "mount": "/mnt/a"}
    refused("shares[1].tag", shares=[a, {**a, "mount": "/mnt/b"}], share_allowed_dirs=dirs)
    refused("shares[1].mount", shares=[a, {**a, "tag": "b"}], share_allowed_dirs=dirs)
    refused("shares", shares={"a": a}, share_allowed_dirs=dirs)
    refused("share_allowed_dirs", shares=[a], share_allowed_dirs=["srv"])


# ---- the path rule on the host -------------------------------------------------


@pytest.fixture
def allowed(tmp_path):
    """An allowed directory as the rule wants it: root's (the tests' user's),
    not writable by others."""
    root = tmp_path / "allowed"
    root.mkdir(mode=0o755)
    (root / "data").mkdir()
    return root


def share(path, tag="data"):
    return ShareSpec(os.path.normpath(str(path)), tag)


def test_a_directory_inside_is_accepted_as_its_real_path(allowed):
    assert check_source(share(allowed / "data"), (str(allowed),), 0) == str(allowed / "data")
    # A link the trusted user made, resolved: the domain gets the real path.
    (allowed / "link").symlink_to(allowed / "data")
    assert check_source(share(allowed / "link"), (str(allowed),), 0) == str(allowed / "data")


def test_a_link_planted_inside_pointing_out_is_refused(allowed, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    with pytest.raises(SpecError, match="outside share_allowed_dirs") as err:
        check_source(share(allowed / "escape"), (str(allowed),), 3)
    assert err.value.key == "shares[3].source"
    (allowed / "root").symlink_to("/")
    with pytest.raises(SpecError, match="outside"):
        check_source(share(allowed / "root" / "etc"), (str(allowed),), 0)


def test_missing_and_non_directory_sources_are_refused(allowed):
    with pytest.raises(SpecError, match="does not exist"):
        check_source(share(allowed / "nope"), (str(allowed),), 0)
    (allowed / "file").write_text("x")
    with pytest.raises(SpecError, match="not a directory"):
        check_source(share(allowed / "file"), (str(allowed),), 0)


def test_dotdot_never_reaches_the_host_check():
    with pytest.raises(SpecError, match=r"'\.\.'"):
        shares.parse([{"source": "/srv/shares/a/../../../etc", "tag": "x"}], ["/srv/shares"])


def test_a_directory_others_can_write_above_the_source_is_refused(allowed):
    allowed.chmod(0o777)  # anyone could swap data for a link to /
    with pytest.raises(SpecError, match="writable by others"):
        check_source(share(allowed / "data"), (str(allowed),), 0)
    allowed.chmod(0o1777)  # sticky, like /tmp: others cannot rename root's entries
    assert check_source(share(allowed / "data"), (str(allowed),), 0)
    allowed.chmod(0o755)
    # The source itself may be open to others: its name is in a directory they cannot write.
    (allowed / "data").chmod(0o777)
    assert check_source(share(allowed / "data"), (str(allowed),), 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a file to another user")
def test_a_link_or_directory_of_another_user_is_refused(allowed):
    (allowed / "data").chmod(0o755)
    os.chown(allowed / "data", 65534, 65534)
    with pytest.raises(SpecError, match="belongs to uid 65534"):
        check_source(share(allowed / "data"), (str(allowed),), 0)
    os.chown(allowed / "data", 0, 0)
    (allowed / "theirs").symlink_to(allowed / "data")
    os.lchown(allowed / "theirs", 65534, 65534)
    with pytest.raises(SpecError, match="symbolic link made by uid 65534"):
        check_source(share(allowed / "theirs"), (str(allowed),), 0)


# ---- the daemon ------------------------------------------------------------------


def descriptor(folder, name, binary, kind="fs"):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps({"type": kind, "binary": str(binary)}))


def fake_daemon(path, help_text):
    path.write_text(f"#!/bin/sh\necho '{help_text}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_daemon_is_found_as_libvirt_finds_it(tmp_path):
    usr, etc = tmp_path / "usr", tmp_path / "etc"
    old = fake_daemon(tmp_path / "old", "-o source=PATH")
    new = fake_daemon(tmp_path / "new", "--readonly")
    descriptor(usr, "50-virtiofsd.json", old)
    descriptor(usr, "10-gpu.json", new, kind="gpu")
    assert virtiofs.find_daemon((str(usr), str(etc))) == str(old)
    descriptor(etc, "50-virtiofsd.json", new)  # same name, higher priority: replaces
    assert virtiofs.find_daemon((str(usr), str(etc))) == str(new)
    descriptor(etc, "50-virtiofsd.json", tmp_path / "missing")
    assert virtiofs.find_daemon((str(usr), str(etc))) is None
    assert virtiofs.has_readonly(str(new)) and not virtiofs.has_readonly(str(old))


class LocalConn:
    def getDomainCapabilities(self, *args):  # noqa: N802 - libvirt's name
        return (
            "<domainCapabilities><devices><filesystem supported='yes'>"
            "<enum name='driverType'><value>path</value><value>virtiofs</value></enum>"
            "</filesystem></devices></domainCapabilities>"
        )

    def getURI(self):  # noqa: N802
        return "qemu:///system"

    def getType(self):  # noqa: N802
        return "QEMU"

    def getLibVersion(self):  # noqa: N802
        return 11_003_000


class Libvirt9(LocalConn):
    def getLibVersion(self):  # noqa: N802
        return 9_000_000


class NoVirtiofs(LocalConn):
    def getDomainCapabilities(self, *args):  # noqa: N802
        return "<domainCapabilities><devices/></domainCapabilities>"


def test_no_daemon_names_the_package(tmp_path):
    with pytest.raises(SpecError, match="virtiofsd") as err:
        virtiofs.check_host(LocalConn(), None, True, (str(tmp_path),))
    assert err.value.key == "shares"
    assert "install the package virtiofsd" in err.value.accepted


def test_readonly_needs_a_daemon_with_readonly(tmp_path):
    etc = tmp_path / "etc"
    descriptor(etc, "50-virtiofsd.json", fake_daemon(tmp_path / "c", "-o source=PATH"))
    assert virtiofs.check_host(LocalConn(), None, True, (str(etc),)) is None
    with pytest.raises(SpecError) as err:
        virtiofs.check_host(LocalConn(), 2, True, (str(etc),))
    assert err.value.key == "shares[2].readonly"
    descriptor(etc, "50-virtiofsd.json", fake_daemon(tmp_path / "r", "--readonly"))
    assert virtiofs.check_host(LocalConn(), 2, True, (str(etc),)) is None
    # libvirt before 11.0 refuses <readonly/> on virtiofs (Debian 12 has 9.0).
    with pytest.raises(SpecError, match=r"libvirt 9\.0\.0 .*since 11\.0\.0") as err:
        virtiofs.check_host(Libvirt9(), 0, True, (str(etc),))
    assert err.value.key == "shares[0].readonly"
    assert virtiofs.check_host(Libvirt9(), None, True, (str(etc),)) is None


def test_a_qemu_without_virtiofs_is_refused(tmp_path):
    with pytest.raises(SpecError, match="no virtiofs device") as err:
        virtiofs.check_host(NoVirtiofs(), None, False, (str(tmp_path),))
    assert err.value.key == "shares"


def test_a_remote_host_says_what_it_could_not_check(tmp_path):
    note = virtiofs.check_host(LocalConn(), 0, False, (str(tmp_path),))
    assert "virtiofsd" in note


# ---- the domain and the guest -----------------------------------------------------


def test_shares_become_virtiofs_filesystems_with_shared_memory():
    xml = new_domain("vm1", "qemu", 512, 1, "/var/lib/libvirt/images/vm1.qcow2")
    virtiofs.add_shares(
        xml, [virtiofs.Share("/srv/a", "a", False), virtiofs.Share("/srv/b", "b", True)]
    )
    xml = Domain(xml.to_xml())
    backing = xml.node.find("memoryBacking")
    assert backing.find("source").get("type") == "memfd"
    assert backing.find("access").get("mode") == "shared"
    found = [(f.source_dir, f.tag, f.readonly, f.type) for f in virtiofs.filesystems(xml)]
    assert found == [("/srv/a", "a", False, "mount"), ("/srv/b", "b", True, "mount")]
    assert xml.node.find("devices/filesystem/driver").get("type") == "virtiofs"


def test_hugepages_of_the_base_are_kept_and_shared():
    xml = new_domain("vm1", "qemu", 512, 1, "/x.qcow2")
    xml.node.insert(3, Domain("<memoryBacking><hugepages/></memoryBacking>").node)
    virtiofs.add_shares(xml, [virtiofs.Share("/srv/a", "a", False)])
    backing = xml.node.findall("memoryBacking")
    assert len(backing) == 1
    assert backing[0].find("hugepages") is not None and backing[0].find("source") is None
    assert backing[0].find("access").get("mode") == "shared"


def test_mounts_go_to_fstab_and_are_mounted_at_first_boot():
    config = shares.cloud_config(
        (
            ShareSpec("/srv/a", "a", False, "/mnt/a"),
            ShareSpec("/srv/b", "b", True, "/srv/b"),
            ShareSpec("/srv/c", "c"),
        )
    )
    assert config["write_files"] == [
        {
            "path": "/etc/fstab",
            "append": True,
            "content": "a /mnt/a virtiofs defaults,nofail 0 0\n"
            "b /srv/b virtiofs defaults,nofail,ro 0 0\n",
        }
    ]
    assert config["runcmd"] == [
        ["mkdir", "-p", "/mnt/a"],
        ["mount", "/mnt/a"],
        ["mkdir", "-p", "/srv/b"],
        ["mount", "/srv/b"],
    ]
    assert shares.cloud_config((ShareSpec("/srv/c", "c"),)) == {}


def test_a_mount_makes_a_seed_even_without_cloud_init():
    s = spec(
        shares=[{"source": "/srv/shares/a", "tag": "a", "mount": "/mnt/a"}],
        share_allowed_dirs=["/srv/shares"],
        deploy=False,
    )
    iso = deploy.seed_iso(s, None, None)
    assert iso is not None and b"a /mnt/a virtiofs" in iso
    s = spec(shares=[{"source": "/srv/shares/a", "tag": "a"}], share_allowed_dirs=["/srv/shares"])
    assert deploy.seed_iso(s, None, None) is None


class RemoteConn(LocalConn):
    def getURI(self):  # noqa: N802
        return "qemu+ssh://root@hv1.example/system"


def test_a_remote_hypervisors_shares_are_checked_as_written_and_say_so():
    from salt_kvm.cloud import sharehost

    wanted = (ShareSpec("/srv/shares/link-or-not", "data"),)
    checked = sharehost.check(RemoteConn(), wanted, ("/srv/shares",))
    # Not resolved on the master's filesystem: the path is the hypervisor's.
    assert checked.shares == [virtiofs.Share("/srv/shares/link-or-not", "data", False)]
    assert "hv1.example" in checked.unchecked and "not on its filesystem" in checked.unchecked
    assert sharehost.check(RemoteConn(), (), ("/srv/shares",)).shares == []


def test_a_refused_mount_is_shown_as_given():
    exc = refused(
        "shares[0].mount",
        shares=[{"source": "/srv/shares/a", "tag": "x", "mount": "/mnt/x; rm -rf /"}],
    )
    assert "'/mnt/x; rm -rf /' is not a guest path" in str(exc)

"""salt-cloud with salt-kvm's libvirt driver against real libvirtd, booted guests
and a real salt-master: profiles become minions that answer test.ping."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from salt_kvm import ssh
from salt_kvm.nat import firewall, forwards
from salt_kvm.virt import lifecycle, pools, qemuimg
from salt_kvm.virt.domain import Domain

from . import saltenv
from .cloudcheck import assert_gone, cloud_error, created, sized_profile
from .conftest import GUEST_PASSWORD, GUEST_USER, IMAGES, POOL, PREFIX, unique
from .guests import boot_guest, define_guest, remove_guest, wait_booted

NAT_PORT = saltenv.port("cloud_forward")
EXAMPLES = Path(__file__).resolve().parents[2] / "profiles.example"


def test_profile_makes_a_sized_minion_that_pings(hv, salt, base_domain, pool_volumes):
    name = unique("sized")
    before = pool_volumes()
    salt.write_profiles(
        {"sized": sized_profile(base_domain, salt, cpus=2, memory="768MB", disk_size="4G")},
        "sized.conf",
    )
    watcher = salt.watch_events(f"salt/cloud/{name}/*")
    proc = salt.cloud("-p", "sized", name)
    events = salt.collected_events(watcher)
    steps = [tag.rsplit("/", 1)[1] for tag, _ in events]
    assert steps == ["creating", "requesting", "waiting_for_ip", "deploying", "created"], events
    assert all(
        "elapsed" in data["data"] if "data" in data else "elapsed" in data for _, data in events
    )
    try:
        info = created(proc, name)
        assert info["vcpus"] == 2 and info["memory_mib"] == 768
        # -l info tells each step with its time (and the address polling is quiet).
        for step in ("clone", "start", "ip", "deploy", "total"):
            assert f"{name}: {step} done at" in proc.stderr, proc.stderr[-3000:]
        assert salt.salt(name, "test.ping") == {name: True}
        grains = salt.salt(name, "grains.item", "num_cpus", "role", "host")[name]
        assert grains["num_cpus"] == 2 and grains["role"] == "salt-kvm-test"
        assert grains["host"] == name
        mem_kib = int(salt.salt(name, "cmd.run", "awk '/MemTotal/ {print $2}' /proc/meminfo")[name])
        assert 600 * 1024 < mem_kib <= 768 * 1024
        disk = int(salt.salt(name, "cmd.run", "lsblk -bdno SIZE /dev/vda")[name])
        assert disk == 4 * 1024**3
        rootfs = int(salt.salt(name, "cmd.run", "df -B1 --output=size / | tail -1")[name])
        assert rootfs > 3.5 * 1024**3  # the image's 3 GiB root grew with the disk
        # Salt's conventions: list_nodes_min, and update_cachedir's node cache.
        minimal = json.loads(salt.cloud("-f", "list_nodes_min", PROVIDER).stdout)
        assert minimal[PROVIDER]["libvirt"][name] == {"id": name, "state": "running"}
        assert cached_nodes(salt) == {name}
    finally:
        salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, pool_volumes)
    assert cached_nodes(salt) == set()


PROVIDER = "test-kvm"


def cached_nodes(salt):
    """The nodes salt-cloud's update_cachedir cache holds for the test provider."""
    return {p.stem for p in salt.root.rglob(f"active/libvirt/{PROVIDER}/*.p")}


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"wait_for_ip_timeout": 3}, "got no IP address from ip-learning within 3s"),
        # a bridge that does not exist: only starting the domain finds out
        # (ip_source arp: the lease source is refused up front on bridges only)
        ({"nics": [{"bridge": "skt-nobr0"}], "ip_source": "arp"}, "skt-nobr0"),
        # valid for the profile, refused by libvirt's define (machine type limit)
        ({"cpus": 300}, "Maximum CPUs greater than specified machine type limit"),
    ],
    ids=["ip-timeout", "libvirt-start-error", "libvirt-define-error"],
)
def test_failures_leave_nothing_behind(hv, salt, base_domain, pool_volumes, extra, message):
    name = unique("fault")
    before = pool_volumes()
    salt.write_profiles({"fault": sized_profile(base_domain, salt, **extra)}, "fault.conf")
    proc = salt.cloud("-p", "fault", name, check=False)
    assert message in cloud_error(proc, name)
    assert "Everything this run created was removed" in cloud_error(proc, name)
    assert_gone(hv, salt, name, before, pool_volumes)


def test_wrong_ssh_password_leaves_nothing_behind(hv, salt, base_domain, pool_volumes):
    name = unique("badpw")
    before = pool_volumes()
    salt.write_profiles({"badpw": sized_profile(base_domain, salt, password="wrong")}, "badpw.conf")
    proc = salt.cloud("-p", "badpw", name, check=False)
    assert "SSH login as 'root'" in cloud_error(proc, name)
    assert_gone(hv, salt, name, before, pool_volumes)


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({"clone_strategy": "linked"}, ["clone_strategy", "quick, full"]),
        ({"memory": "lots"}, ["memory", "2G"]),
        ({"script": "no-such-script"}, ["script", "no-such-script"]),
        ({"wait_for_minion_timeout": "soon"}, ["wait_for_minion_timeout", "seconds"]),
        ({"nics": [{"network": "salt-kvm-test", "ip": "192.168.213.9"}]}, ["nics[0].ip", "mac"]),
        ({"nics": ["skt-no-such-network"]}, ["nics[0].network", "salt-kvm-test"]),
        ({"memroy": "1G"}, ["memroy", "did you mean 'memory'"]),
        ({"cpus": float("inf")}, ["cpus", "finite"]),  # was an OverflowError, key kept
        (
            {
                "cloud_init": {
                    "user_data": "#cloud-config\nx: {{ name + 1 }}\n",
                    "template": "jinja",
                }
            },
            ["cloud_init.user_data", "concatenate"],  # a Jinja TypeError
        ),
        ({"description": "web\x1bserver"}, ["description", "control character"]),
    ],
    ids=[
        "clone_strategy",
        "memory",
        "script",
        "minion-timeout",
        "ip-without-mac",
        "missing-network",
        "key-typo",
        "cpus-inf",
        "jinja-type-error",
        "description-control-char",
    ],
)
def test_bad_profile_value_names_the_key_and_creates_nothing(
    hv, salt, base_domain, pool_volumes, extra, expected
):
    name = unique("badkey")
    before = pool_volumes()
    ours = lambda: {d.name() for d in hv.listAllDomains(0) if d.name().startswith(PREFIX)}  # noqa: E731
    domains = ours()
    salt.write_profiles({"badkey": sized_profile(base_domain, salt, **extra)}, "bk.conf")
    proc = salt.cloud("-p", "badkey", name, check=False)
    text = cloud_error(proc, name)
    for word in expected:
        assert word in text, text
    assert ours() == domains
    assert_gone(hv, salt, name, before, pool_volumes)


def test_salt_3007_docs_profile_works_with_names_credentials_and_master_changed(
    hv, salt, base_domain, pool_volumes
):
    """The seed profile (full clone, legacy deploy_command, script_args -F, grains)."""
    profiles = yaml.safe_load((EXAMPLES / "cloud.profiles.d" / "centos7.conf").read_text())
    profile = profiles["centos7"]
    profile.update(provider="test-kvm", base_domain=base_domain, password=GUEST_PASSWORD)
    profile["minion"].update(salt.minion_settings())
    assert profile["deploy_command"] == "sh /tmp/.saltcloud/deploy.sh"
    salt.write_profiles({"centos7": profile}, "centos7.conf")
    name = unique("centos7")
    before = pool_volumes()
    salt.cloud("-p", "centos7", name)
    try:
        assert salt.salt(name, "test.ping") == {name: True}
        assert salt.salt(name, "grains.item", "clones-are-awesome")[name] == {
            "clones-are-awesome": True
        }
        # a full clone: the guest's disk has no backing file
        vol = hv.storageVolLookupByPath(f"{IMAGES}/{name}.qcow2")
        assert "<backingStore" not in vol.XMLDesc(0) or "<backingStore/>" in vol.XMLDesc(0)
    finally:
        salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, pool_volumes)


def test_parallel_map_of_three(hv, salt, base_domain, pool_volumes):
    names = [unique(f"map{i}") for i in range(3)]
    before = pool_volumes()
    salt.write_profiles({"mapped": sized_profile(base_domain, salt, memory=512)}, "mapped.conf")
    mapfile = salt.conf / "cloud.maps.d" / "three.map"
    mapfile.write_text(yaml.safe_dump({"mapped": names}))
    salt.cloud("-P", "-m", str(mapfile))
    try:
        nodes = json.loads(salt.cloud("-F").stdout)["test-kvm"]["libvirt"]
        ours = {n: nodes[n] for n in names}
        macs = {node["macs"][0] for node in ours.values()}
        ips = {node["private_ips"][0] for node in ours.values()}
        assert len(macs) == 3 and len(ips) == 3
        pings = salt.salt(f"{PREFIX}map*", "test.ping")
        assert {n: pings.get(n) for n in names} == {n: True for n in names}
    finally:
        salt.cloud("-d", *names)
    for name in names:
        assert_gone(hv, salt, name, before, pool_volumes)


def test_reserved_address_nat_rules_actions_and_listing(hv, salt, base_domain, pool_volumes):
    """A NIC with mac+ip gets that address through a DHCP reservation; the
    profile's nat_rules forward a host port to it (shown by show_instance); the
    actions work on the guest; -d takes the reservation and the forward away too."""
    name = unique("resv")
    mac, ip = "52:54:00:5a:1e:77", f"{saltenv.TEST_NET_PREFIX}.77"
    network = hv.networkLookupByName("salt-kvm-test")
    before = pool_volumes()
    salt.write_profiles(
        {
            "resv": sized_profile(
                base_domain,
                salt,
                nics=[{"network": "salt-kvm-test", "mac": mac, "ip": ip}],
                nat_rules=[{"guest": 22, "host": NAT_PORT}],
            )
        },
        "resv.conf",
    )
    salt.cloud("-p", "resv", name)
    try:
        assert f"ip='{ip}'" in network.XMLDesc(0)
        shown = json.loads(salt.cloud("-a", "show_instance", name).stdout)
        assert json.dumps(shown).count(ip) >= 1
        (nat_shown,) = [v["nat"] for v in _values(shown) if isinstance(v, dict) and "nat" in v]
        assert [(f["host"], f["guest"], f["proto"]) for f in nat_shown] == [(NAT_PORT, 22, "tcp")]
        with ssh.connect("127.0.0.1", GUEST_USER, GUEST_PASSWORD, port=NAT_PORT) as session:
            assert session.check("cat /sys/class/net/eth0/address").strip() == mac
        assert salt.salt(name, "cmd.run", "ip -4 -o addr show eth0")[name].count(ip) == 1
        images = json.loads(salt.cloud("--list-images", "test-kvm").stdout)
        assert base_domain in json.dumps(images) and name not in json.dumps(images)
        salt.cloud("-a", "stop", name)
        dom = hv.lookupByName(name)
        for _ in range(240):
            if not dom.isActive():
                break
            time.sleep(0.5)
        assert not dom.isActive()
        salt.cloud("-a", "start", name)
        assert dom.isActive()
    finally:
        salt.cloud("-d", name)
    assert f"ip='{ip}'" not in network.XMLDesc(0)
    assert name not in forwards.listing()
    assert name not in json.dumps(firewall.table_comments())
    assert_gone(hv, salt, name, before, pool_volumes)


def _values(tree):
    """Every dict and value nested in salt-cloud's JSON output."""
    yield tree
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _values(value)


def test_salt_3007_master_and_salt_cloud_use_salt_kvm(
    hv, tmp_path_factory, base_domain, pool_volumes
):
    """On Salt 3007, salt-kvm's driver replaces Salt's own libvirt driver."""
    venv = Path(os.environ.get("SALT_KVM_VENV_3007", "/opt/salt-kvm/venv-3007"))
    env = saltenv.start_master(
        tmp_path_factory.mktemp("salt3007"), venv / "bin", port_offset=saltenv.offset("master_3007")
    )
    try:
        env.write_providers(saltenv.provider())
        env.write_profiles({"sized": sized_profile(base_domain, env, cpus=2)})
        assert "3007" in env.run("salt-cloud", "--version").stdout
        name = unique("s3007")
        before = pool_volumes()
        info = created(env.cloud("-p", "sized", name), name)
        try:
            assert info["vcpus"] == 2 and info["base_domain"] == base_domain  # salt-kvm's answer
            assert env.salt(name, "test.ping") == {name: True}
        finally:
            env.cloud("-d", name)
        assert_gone(hv, env, name, before, pool_volumes)
    finally:
        saltenv.stop_master(env)


def test_cloud_init_deploy_needs_no_ssh_and_leaves_no_seed(hv, salt, base_domain, pool_volumes):
    """deploy_method: cloud-init: minion config and accepted keys in a NoCloud
    seed; no SSH credentials at all; the seed is ejected and deleted."""
    name = unique("seeded")
    before = pool_volumes()
    profile = sized_profile(base_domain, salt, deploy_method="cloud-init")
    del profile["password"], profile["script"]
    salt.write_profiles({"seeded": profile}, "seeded.conf")
    info = created(salt.cloud("-p", "seeded", name), name)
    try:
        assert info["deploy"]["method"] == "cloud-init"
        assert salt.salt(name, "test.ping") == {name: True}
        assert pool_volumes() == before | {f"{name}.qcow2"}  # no seed volume left
        cdroms = [d for d in info["disks"] if d["device"] == "cdrom"]
        assert cdroms and all(d["path"] is None for d in cdroms)
        assert salt.salt(name, "grains.item", "host")[name] == {"host": name}
    finally:
        salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, pool_volumes)


# An image whose Salt is not a packaged service: no salt-minion.service unit.
NO_UNIT = (
    "rm -f /etc/systemd/system/salt-minion.service "
    "/etc/systemd/system/multi-user.target.wants/salt-minion.service && systemctl daemon-reload"
)


def _seeded_profile(base_domain, salt, bootcmd, **extra):
    profile = sized_profile(
        base_domain,
        salt,
        deploy_method="cloud-init",
        cloud_init={"user_data": {"bootcmd": bootcmd}},  # runs before salt-kvm's bootcmd
        **extra,
    )
    del profile["password"], profile["script"]
    return profile


def test_cloud_init_deploy_on_an_image_without_a_minion_unit(hv, salt, base_domain, pool_volumes):
    """No salt-minion.service in the image, salt-minion on PATH: the minion runs
    as a transient unit and pings. Its id is not the VM's name (``minion: id``):
    -d removes that minion's key too."""
    name = unique("nounit")
    minion_id = f"{name}-m"
    before = pool_volumes()
    profile = _seeded_profile(base_domain, salt, [NO_UNIT])
    profile["minion"]["id"] = minion_id
    salt.write_profiles({"nounit": profile}, "nounit.conf")
    info = created(salt.cloud("-p", "nounit", name), name)
    try:
        assert info["deploy"]["method"] == "cloud-init"
        assert salt.salt(minion_id, "test.ping") == {minion_id: True}
        active = salt.salt(minion_id, "cmd.run", "systemctl is-active salt-kvm-minion.service")
        assert active == {minion_id: "active"}
        assert minion_id in salt.accepted_keys()
    finally:
        salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, pool_volumes)
    assert minion_id not in salt.accepted_keys()


def test_cloud_init_deploy_fails_fast_when_the_guest_cannot_start_a_minion(
    hv, salt, base_domain, pool_volumes
):
    """No unit and no salt-minion on PATH: the create fails as soon as the guest
    says so (read through its agent), naming the cause, and leaves nothing."""
    name = unique("nominion")
    before = pool_volumes()
    broken = [NO_UNIT, "rm -f /usr/bin/salt-minion /usr/local/bin/salt-minion"]
    profile = _seeded_profile(base_domain, salt, broken, wait_for_minion_timeout=900)
    salt.write_profiles({"nominion": profile}, "nominion.conf")
    started = time.monotonic()
    proc = salt.cloud("-p", "nominion", name, check=False)
    elapsed = time.monotonic() - started
    text = cloud_error(proc, name)
    assert f"the minion cannot start in the guest {name}" in text, text
    assert "no salt-minion.service unit and no salt-minion on PATH" in text
    assert "Everything this run created was removed" in text
    assert elapsed < 300, elapsed  # the boot (TCG, shared cores), not the minion wait
    assert_gone(hv, salt, name, before, pool_volumes)


def test_destroy_of_a_guest_a_quick_clone_stands_on_is_refused(hv, salt, base_domain):
    """Guest A is the ``base_domain`` of a quick clone B: ``salt-cloud -d A`` is
    refused naming B, A keeps its volume, and B still boots from its chain."""
    name_a, name_b = unique("chain-a"), unique("chain-b")
    try:
        dom_a, _ = define_guest(hv, base_domain, name_a)  # shut off: a base for B
        a_volume = Domain(dom_a.XMLDesc(0)).disks[0].path
        b = boot_guest(hv, name_a, name_b)
        b_volume = Domain(b.dom.XMLDesc(0)).disks[0].path
        proc = salt.cloud("-d", name_a, check=False)
        text = proc.stdout + proc.stderr
        assert name_b in text and a_volume in text, text
        assert hv.lookupByName(name_a) and os.path.exists(a_volume)
        chain = [c["filename"] for c in qemuimg.info(b_volume, chain=True)]
        assert chain[:2] == [b_volume, a_volume], chain
        # B's running QEMU holds its files open: only a fresh start proves the chain whole
        b.dom.destroy()
        b.dom.create()
        wait_booted(b.dom)
        assert b.run("echo still-here").strip() == "still-here"
        # once B is gone, A may go
        lifecycle.remove(hv, name_b)
        salt.cloud("-d", name_a)
        assert not os.path.exists(a_volume)
    finally:
        remove_guest(hv, name_b)
        remove_guest(hv, name_a)


# ---- interrupts (issue #13 item 11) ----------------------------------------------


def _fixed_nic(hv):
    """A MAC and a free address on the test network, for a DHCP reservation:
    outside its dynamic range (.100-.250), not reserved, not leased."""
    import random

    from salt_kvm.cloud import dhcp

    leased = {lease["ipaddr"] for lease in hv.networkLookupByName("salt-kvm-test").DHCPLeases()}
    for _ in range(50):
        suffix = random.randint(20, 99)
        if f"{saltenv.TEST_NET_PREFIX}.{suffix}" in leased or suffix == 77:  # 77: test_cloud's
            continue
        mac, ip = (
            f"52:54:00:5b:{suffix:02x}:{random.randint(0, 255):02x}",
            (f"{saltenv.TEST_NET_PREFIX}.{suffix}"),
        )
        try:
            dhcp.check(hv, "salt-kvm-test", mac, ip, "ip")
        except Exception:  # noqa: BLE001 - taken by another test run: try another
            continue
        return mac, ip
    raise AssertionError("no free address on salt-kvm-test")


def _leftovers(hv, salt, name, mac):
    """What a create of ``name`` may have left: domain, reservation, key, volumes."""
    found = []
    if name in {d.name() for d in hv.listAllDomains(0)}:
        found.append("domain")
    if mac in hv.networkLookupByName("salt-kvm-test").XMLDesc(0):
        found.append("reservation")
    if name in salt.accepted_keys():
        found.append("minion key")
    pool = hv.storagePoolLookupByName(POOL)
    pools.refresh(pool)
    found += [v for v in pool.listVolumes() if v.startswith(name)]
    return found


def _interrupt_profile(hv, salt, base_domain, stem):
    mac, ip = _fixed_nic(hv)
    profile = sized_profile(
        base_domain,
        salt,
        nics=[{"network": "salt-kvm-test", "mac": mac, "ip": ip}],
        cloud_init={"files": {"/etc/motd": "interrupted\n"}},  # a seed volume too
    )
    salt.write_profiles({stem: profile}, f"{stem}.conf")
    return mac


def _start_until_waiting_for_ip(hv, salt, stem, name, mac):
    watcher = salt.watch_events(f"salt/cloud/{name}/waiting_for_ip")
    proc = salt.cloud_started("-p", stem, name)
    try:
        tag = salt.next_event(watcher, 600)
    finally:
        watcher.terminate()
        watcher.communicate(timeout=30)
    assert tag and tag.endswith("waiting_for_ip"), (tag, proc.poll())
    made = _leftovers(hv, salt, name, mac)
    assert {"domain", "reservation", "minion key", f"{name}-seed.iso"} <= set(made), made
    return proc


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGTERM],
        [signal.SIGINT],
        [signal.SIGHUP],  # the terminal closed: killed on the spot before
        [signal.SIGINT] * 4,  # Ctrl-C hammered: the later ones cut the rollback short before
    ],
    ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGINT-repeated"],
)
def test_an_interrupt_mid_create_removes_everything(hv, salt, base_domain, signals):
    """SIGTERM, Ctrl-C or a hangup while salt-cloud waits for the guest's
    address: the domain, its volumes, the seed, the DHCP reservation and the
    minion key go."""
    name = unique("intr")
    mac = _interrupt_profile(hv, salt, base_domain, "intr")
    proc = _start_until_waiting_for_ip(hv, salt, "intr", name, mac)
    for signum in signals:
        if proc.poll() is None:
            proc.send_signal(signum)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert _leftovers(hv, salt, name, mac) == [], out + err


def test_after_sigkill_the_next_create_of_the_name_clears_what_was_left(
    hv, salt, base_domain, pool_volumes
):
    """SIGKILL runs no rollback: the domain, seed, reservation and key stay.
    Creating the same name again removes them first and works; destroying it
    then leaves nothing stale."""
    name = unique("kill")
    mac = _interrupt_profile(hv, salt, base_domain, "kill")
    proc = _start_until_waiting_for_ip(hv, salt, "kill", name, mac)
    proc.kill()
    proc.communicate(timeout=60)
    assert "domain" in _leftovers(hv, salt, name, mac)  # what a rollback would have removed
    salt.cloud("-p", "kill", name)
    try:
        assert salt.salt(name, "test.ping") == {name: True}
        assert f"{name}-seed.iso" not in _leftovers(hv, salt, name, mac)  # the new one is gone too
    finally:
        salt.cloud("-d", name)
    assert _leftovers(hv, salt, name, mac) == []


def test_cleanup_function_clears_what_a_killed_create_left(hv, salt, base_domain):
    name = unique("kclean")
    mac = _interrupt_profile(hv, salt, base_domain, "kclean")
    proc = _start_until_waiting_for_ip(hv, salt, "kclean", name, mac)
    proc.kill()
    proc.communicate(timeout=60)
    out = json.loads(salt.cloud("-f", "cleanup", "test-kvm").stdout)
    assert name in json.dumps(out), out
    assert _leftovers(hv, salt, name, mac) == []


def test_two_fixed_ip_nics_on_one_network(hv, salt, base_domain, pool_volumes):
    """Both NICs get their reserved address (reservations are keyed by MAC; the
    VM name goes on the first), and -d releases both."""
    name = unique("twonic")
    before = pool_volumes()
    (mac1, ip1), (mac2, ip2) = _fixed_nic(hv), _fixed_nic(hv)
    while ip2 == ip1 or mac2 == mac1:
        mac2, ip2 = _fixed_nic(hv)
    nics = [
        {"network": "salt-kvm-test", "mac": mac1, "ip": ip1},
        {"network": "salt-kvm-test", "mac": mac2, "ip": ip2},
    ]
    salt.write_profiles(
        {"twonic": sized_profile(base_domain, salt, nics=nics, deploy=False)}, "twonic.conf"
    )
    salt.cloud("-p", "twonic", name)
    network = hv.networkLookupByName("salt-kvm-test")
    try:
        xml = network.XMLDesc(0)
        assert f"ip='{ip1}'" in xml and f"ip='{ip2}'" in xml
        leased = {}
        for _ in range(240):
            leased = {lease["mac"]: lease["ipaddr"] for lease in network.DHCPLeases()}
            if leased.get(mac1) == ip1 and leased.get(mac2) == ip2:
                break
            time.sleep(0.5)
        assert (leased.get(mac1), leased.get(mac2)) == (ip1, ip2), leased
    finally:
        salt.cloud("-d", name)
    xml = network.XMLDesc(0)
    assert mac1 not in xml and mac2 not in xml
    assert_gone(hv, salt, name, before, pool_volumes)

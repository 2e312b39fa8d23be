"""Several hypervisors: the provider's ``hosts``, a profile's ``location``,
where ``auto`` puts a guest, and placements parallel creates share (#15)."""

import multiprocessing
import os

import pytest

from salt_kvm.cloud import locations, placement
from salt_kvm.cloud.locations import AUTO, Room, check_location, choose, parse_hosts
from salt_kvm.errors import SaltKvmError, SpecError

HOSTS = {"hv1": "qemu+ssh://root@hv1/system", "hv2": "qemu+ssh://root@hv2/system"}


def test_hosts_parse_in_order():
    assert parse_hosts(HOSTS) == HOSTS
    assert list(parse_hosts({"b": "qemu:///system", "a": "test:///default"})) == ["b", "a"]


def test_url_alone_is_one_host():
    assert parse_hosts(None, "qemu:///system") is None
    assert parse_hosts(None) is None


def test_hosts_and_url_together_are_refused_by_name():
    with pytest.raises(SpecError, match="^hosts: is given together with url .*either url"):
        parse_hosts(HOSTS, "qemu:///system")


@pytest.mark.parametrize(
    "hosts",
    [{}, [], "qemu:///system", ["hv1", "hv2"], {"": "qemu:///system"}, {"a b": "qemu:///system"}],
)
def test_hosts_that_are_not_a_mapping_of_names_are_refused(hosts):
    with pytest.raises(SpecError) as err:
        parse_hosts(hosts)
    assert err.value.key == "hosts"
    assert "mapping of host name" in str(err.value)


def test_auto_is_not_a_host_name():
    with pytest.raises(SpecError, match="'auto' is not a usable host name .*let salt-kvm choose"):
        parse_hosts({"auto": "qemu:///system"})


@pytest.mark.parametrize("uri", [None, "", "  ", 5, "qemu:///system extra", {"url": "x"}])
def test_a_host_without_a_usable_uri_is_refused_naming_it(uri):
    with pytest.raises(SpecError) as err:
        parse_hosts({"hv1": "qemu:///system", "rack7": uri})
    assert err.value.key == "hosts:rack7"


def test_a_uri_with_a_password_is_not_shown_in_the_refusal():
    with pytest.raises(SpecError) as err:
        parse_hosts({"hv1": {"url": "qemu+ssh://root:s3cret@hv1/system"}})
    assert "s3cret" not in str(err.value)


def test_location_defaults_to_auto_with_several_hosts():
    assert check_location(None, HOSTS) == AUTO
    assert check_location("", HOSTS) == AUTO
    assert check_location("auto", HOSTS) == AUTO
    assert check_location("hv2", HOSTS) == "hv2"


@pytest.mark.parametrize("value", ["hv3", "HV1", 1, ["hv1"], "hv1,hv2"])
def test_an_unknown_location_is_refused_with_the_host_names(value):
    with pytest.raises(SpecError) as err:
        check_location(value, HOSTS)
    assert err.value.key == "location"
    assert err.value.accepted == "auto, hv1, hv2"


def test_one_host_providers_take_no_location_but_auto():
    assert check_location(None, None) is None
    assert check_location("auto", None) is None
    with pytest.raises(SpecError, match="^location: 'hv1': this provider has one hypervisor"):
        check_location("hv1", None)


def room(name, memory=8192, committed=0, cpus=4, guests=(), **kw):
    return Room(
        name=name,
        memory_mib=memory,
        committed_mib=committed,
        cpus=cpus,
        guests=list(guests),
        need_memory_mib=kw.pop("need", 1024),
        need_cpus=kw.pop("need_cpus", 1),
        **kw,
    )


def test_auto_takes_the_host_with_the_most_uncommitted_memory():
    rooms = [room("a", 8192, 6144), room("b", 4096, 0), room("c", 16384, 14336)]
    assert choose(rooms, AUTO).name == "b"


def test_ties_go_to_fewer_guests_then_the_first_name():
    rooms = [room("c", guests=["x"]), room("b"), room("a", guests=["y", "z"])]
    assert choose(rooms, AUTO).name == "b"
    assert choose([room("zeta"), room("alpha"), room("mid")], AUTO).name == "alpha"
    assert (
        choose([room("alpha"), room("zeta")], AUTO).name
        == choose([room("zeta"), room("alpha")], AUTO).name
    )


def test_auto_skips_hosts_that_do_not_fit_or_lack_something_or_did_not_answer():
    rooms = [
        Room(name="down", error="cannot connect"),
        room("full", 65536, 65000),
        room("nobase", 65536, missing=["base domain b"]),
        room("fewcpus", 65536, cpus=2, need_cpus=4),
        room("ok", 4096, need_cpus=4),
    ]
    assert choose(rooms, AUTO).name == "ok"


def test_no_host_fits_names_each_host_and_why():
    rooms = [
        Room(name="down", error="cannot connect"),
        room("full", 2048, 1536),
        room("nonet", missing=["network salt-kvm-test"]),
    ]
    with pytest.raises(SaltKvmError) as err:
        choose(rooms, AUTO)
    message = str(err.value)
    assert message.startswith("location auto: no host can take the guest")
    assert "down did not answer: cannot connect" in message
    assert "full 512 MiB uncommitted memory, the guest needs 1024 MiB" in message
    assert "nonet has no network salt-kvm-test" in message


def test_a_named_location_is_checked_too():
    rooms = [room("a"), room("b", 2048, 2048)]
    assert choose(rooms, "a").name == "a"
    with pytest.raises(SaltKvmError, match="^location b: b 0 MiB uncommitted memory"):
        choose(rooms, "b")


def test_a_name_defined_on_a_host_goes_there_and_elsewhere_is_refused():
    rooms = [room("a", 65536), room("b", 2048, 2048, holds_name=True)]
    assert choose(rooms, AUTO, "vm1").name == "b"  # resumed there, as on one host
    assert choose(rooms, "b", "vm1").name == "b"
    with pytest.raises(SaltKvmError, match="location a: vm1 already exists on host b"):
        choose(rooms, "a", "vm1")
    rooms[0].holds_name = True
    with pytest.raises(SaltKvmError, match="vm1 is defined on several hosts"):
        choose(rooms, AUTO, "vm1")


# ---- placements parallel creates share ----------------------------------------


def test_running_placements_count_on_their_host_once():
    rooms = [room("a", 4096), room("b", 4096)]
    rooms[1].counted = {"started"}
    running = [
        {"name": "vm1", "host": "a", "memory_mib": 2048},
        {"name": "started", "host": "b", "memory_mib": 2048},  # already counted by libvirt
        {"name": "me", "host": "b", "memory_mib": 2048},  # this create's own
        {"name": "gone", "host": "hv9", "memory_mib": 2048},
    ]
    placement.count_running(rooms, running, exclude="me")
    assert [r.committed_mib for r in rooms] == [2048, 0]


def test_placements_of_dead_processes_do_not_count_but_say_where(tmp_path):
    placements = placement.Placements(tmp_path)
    placements.add("vm1", "hv2", 1024)
    assert [r["name"] for r in placements.running()] == ["vm1"]
    record = placements._path("vm1")
    record.write_text(record.read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999'))
    assert placements.running() == []
    assert placements.killed("vm1") == "hv2"
    placements.release("vm1")  # not this process's any more: kept for cleanup
    assert placements.killed("vm1") == "hv2"
    assert oct((tmp_path / "salt-kvm" / "placing").stat().st_mode & 0o777) == "0o700"


def _place_one(cachedir, name, barrier, out):
    """One create's placement, as a parallel salt-cloud process makes it: both
    hosts have room for exactly one 3 GiB guest when the run starts."""
    hosts = {"hv1": "hv1", "hv2": "hv2"}

    def rooms(_hosts, _connect, spec):
        return [room("hv1", 4096, 512, need=3072), room("hv2", 4096, 1024, need=3072)]

    placement.rooms = rooms  # in this child process only
    spec = type("Spec", (), {"name": name})()
    barrier.wait()
    try:
        chosen = placement.place(placement.Placements(cachedir), hosts, None, spec, AUTO)
        out.put((name, chosen.name))
    except SaltKvmError as exc:
        out.put((name, f"refused: {exc}"))
    barrier.wait()  # every create still runs until all have placed


def test_two_concurrent_placements_never_take_the_same_last_room(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_place_one, args=(tmp_path, name, barrier, out))
        for name in ("vm1", "vm2", "vm3")
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    placed = dict(out.get(timeout=5) for _ in procs)
    # All three place at once (a barrier), one at a time inside the lock, and
    # run on until all have placed: each sees the others' placements.
    taken = sorted(v for v in placed.values() if not v.startswith("refused"))
    assert taken == ["hv1", "hv2"], placed
    refused = [v for v in placed.values() if v.startswith("refused")]
    assert len(refused) == 1 and "no host can take the guest" in refused[0]


def test_the_lock_file_is_the_placement_directorys(tmp_path):
    with placement.Placements(tmp_path).locked():
        assert (tmp_path / "salt-kvm" / "placing" / ".lock").exists()
    assert locations.accepted(["b", "a"]) == "auto, a, b"


def test_the_example_cluster_provider_and_map_are_valid():
    from pathlib import Path

    import yaml

    examples = Path(__file__).resolve().parents[3] / "profiles.example"
    providers = yaml.safe_load((examples / "cloud.providers.d" / "cluster.conf").read_text())
    conf = providers["cluster"]
    hosts = parse_hosts(conf["hosts"], conf.get("url"))
    assert list(hosts) == ["hv1", "hv2"]
    spread = yaml.safe_load((examples / "cloud.maps.d" / "spread.map").read_text())
    for entry in spread["debian-sized-cluster"]:
        location = next(iter(entry.values())).get("location") if isinstance(entry, dict) else None
        assert check_location(location, hosts) in ("auto", "hv2")

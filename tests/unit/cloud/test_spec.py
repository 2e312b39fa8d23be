"""Profile dict -> VMSpec: defaults, accepted forms, aliases and every rejection."""

import pytest

from salt_kvm.cloud.spec import NicSpec, build_spec, check_key_typos, check_mapping
from salt_kvm.cloud.topology import CpuTopology, NumaCell, parse_cpu_options, parse_numa
from salt_kvm.errors import SpecError
from salt_kvm.virt.units import GIB, MIB

MINIMAL = {"name": "vm1", "base_domain": "base", "password": "pw"}
MAC = "52:54:00:12:34:56"


def spec(**overrides):
    return build_spec({**MINIMAL, **overrides})


def rejected(values: dict, key: str) -> SpecError:
    """Build ``values`` expecting a SpecError that names ``key`` and what is accepted."""
    with pytest.raises(SpecError) as err:
        build_spec(values)
    assert err.value.key == key, str(err.value)
    assert err.value.accepted, str(err.value)
    assert str(err.value).startswith(f"{key}: ")
    return err.value


# ---- defaults ---------------------------------------------------------------


def test_minimal_profile_gets_the_3007_defaults():
    s = spec()
    assert s.name == "vm1"
    assert s.base_domain == "base"
    assert s.clone_strategy == "full"
    assert s.ip_source == "ip-learning"
    assert s.validate_xml is True
    assert s.wait_for_ip_timeout == 600
    assert s.wait_for_ip_interval == 0.5
    assert s.virt_type == "auto"
    assert s.deploy.enabled is True
    assert s.deploy.method == "ssh"
    assert s.deploy.ssh_username == "root"
    assert s.deploy.ssh_port == 22
    assert s.deploy.password == "pw"
    assert s.deploy.private_key is None
    assert s.deploy.ssh_agent is False


def test_minimal_profile_leaves_sizing_to_the_base():
    s = spec()
    assert s.cpus is None
    assert s.cpu_topology is None
    assert s.numa == []
    assert s.memory_mib is None
    assert s.disk_size is None
    assert s.description is None
    assert s.autostart is False
    assert s.keymap is None
    assert s.vhost is False
    assert s.cpu_shares is None
    assert s.nics is None


def test_spec_error_message_names_key_problem_and_accepted():
    err = SpecError("memory", "is bad", ("1", "2"))
    assert err.key == "memory"
    assert err.problem == "is bad"
    assert err.accepted == "1, 2"
    assert str(err) == "memory: is bad (accepted: 1, 2)"


# ---- sizes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,mib",
    [(2048, 2048), ("2048", 2048), ("2GB", 2048), ("2G", 2048), ("1.5G", 1536), ("64M", 64)],
)
def test_memory_forms(value, mib):
    assert spec(memory=value).memory_mib == mib


@pytest.mark.parametrize(
    "values,size",
    [
        ({"disk_size": 20}, 20 * GIB),
        ({"disk_size": "10G"}, 10 * GIB),
        ({"disk_size": "512M"}, 512 * MIB),
        ({"disk": 20}, 20 * GIB),
        ({"disk": "1.5GiB"}, 1536 * MIB),
        ({"disk_size": "10G", "disk": 20}, 10 * GIB),
        ({"disk_size": None, "disk": 5}, 5 * GIB),
    ],
    ids=["number", "G", "M", "proxmox-gib", "proxmox-string", "disk_size-wins", "none-falls-back"],
)
def test_disk_size_and_proxmox_disk(values, size):
    assert spec(**values).disk_size == size


# ---- aliases ----------------------------------------------------------------


@pytest.mark.parametrize(
    "values,expected",
    [
        ({"description": "web"}, "web"),
        ({"desc": "web"}, "web"),
        ({"desc": "old", "description": "new"}, "new"),
        ({"description": "", "desc": "fallback"}, "fallback"),
    ],
)
def test_description_and_desc(values, expected):
    assert spec(**values).description == expected


@pytest.mark.parametrize(
    "values,expected",
    [
        ({"autostart": True}, True),
        ({"autostart": "yes"}, True),
        ({"autostart": 1}, True),
        ({"onboot": True}, True),
        ({"onboot": "on"}, True),
        ({"onboot": 0}, False),
        ({"onboot": True, "autostart": False}, False),
        ({"onboot": False, "autostart": "true"}, True),
    ],
)
def test_autostart_and_onboot(values, expected):
    assert spec(**values).autostart is expected


@pytest.mark.parametrize("value,shares", [(1024, 1024), ("512", 512), (2, 2), (262144, 262144)])
def test_cpuunits_become_cpu_shares(value, shares):
    assert spec(cpuunits=value).cpu_shares == shares


@pytest.mark.parametrize("value", ["en-us", "fr", "de-ch"])
def test_keymap(value):
    assert spec(keymap=value).keymap == value


@pytest.mark.parametrize(
    "value,source",
    [
        ("ip-learning", "ip-learning"),
        ("lease", "ip-learning"),
        ("qemu-agent", "qemu-agent"),
        ("agent", "qemu-agent"),
        ("arp", "arp"),
        ("auto", "auto"),
        ("", "ip-learning"),
        (None, "ip-learning"),
    ],
)
def test_ip_source_and_aliases(value, source):
    assert spec(ip_source=value).ip_source == source


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("kvm", "kvm"), ("qemu", "qemu")])
def test_virt_type(value, expected):
    assert spec(virt_type=value).virt_type == expected


def test_clone_strategy_quick():
    assert spec(clone_strategy="quick").clone_strategy == "quick"


def test_timeouts_accept_numbers_and_numeric_strings():
    s = spec(wait_for_ip_timeout="30", wait_for_ip_interval=2)
    assert s.wait_for_ip_timeout == 30.0
    assert s.wait_for_ip_interval == 2.0


# ---- cpu_options ------------------------------------------------------------


@pytest.mark.parametrize(
    "value,cpus,expected",
    [
        ("cores=2,threads=1,sockets=2,maxcpus=4", None, CpuTopology(2, 2, 1, 4)),
        ("cores=2,threads=1,sockets=2,maxcpus=4", 2, CpuTopology(2, 2, 1, 4)),
        (" cores = 2 , sockets = 2 ", None, CpuTopology(2, 2, 1, 4)),
        ("cores=2", None, CpuTopology(1, 2, 1, 2)),
        ("cores=2", 4, CpuTopology(2, 2, 1, 4)),
        ("sockets=2", None, CpuTopology(2, 1, 1, 2)),
        ("sockets=2", 4, CpuTopology(2, 2, 1, 4)),
        ("threads=2", None, CpuTopology(1, 1, 2, 2)),
        ("threads=2", 4, CpuTopology(1, 2, 2, 4)),
        ("maxcpus=4", None, CpuTopology(1, 4, 1, 4)),
        ("maxcpus=8,threads=2", 2, CpuTopology(1, 4, 2, 8)),
        ("sockets=2,threads=2", None, CpuTopology(2, 1, 2, 4)),
        ("cores=4,maxcpus=8", None, CpuTopology(2, 4, 1, 8)),
        ({"sockets": 2, "cores": 2}, None, CpuTopology(2, 2, 1, 4)),
        ({"maxcpus": "6", "cores": "3"}, 3, CpuTopology(2, 3, 1, 6)),
    ],
)
def test_cpu_options(value, cpus, expected):
    assert parse_cpu_options(value, cpus) == expected
    s = spec(cpu_options=value, cpus=cpus)
    assert s.cpu_topology == expected
    assert s.cpus == cpus


def test_cpu_options_product_mismatch_names_the_product():
    # The docstring's own example: 1*2*1 = 2 cannot be a 4-vCPU topology for libvirt.
    err = rejected(
        {**MINIMAL, "cpu_options": "cores=2,threads=1,sockets=1,maxcpus=4"}, "cpu_options"
    )
    assert "1*2*1" in err.problem
    assert "maxcpus 4" in err.problem


# ---- numa -------------------------------------------------------------------


def test_numa_string():
    s = spec(cpus=4, numa="node,nodeid=0,cpus=0-1 node,nodeid=1,cpus=2,3")
    assert s.numa == [NumaCell(0, "0-1", None), NumaCell(1, "2,3", None)]


def test_numa_bare_numbers_continue_the_cpu_list():
    cells = parse_numa("node,nodeid=0,cpus=1,3,7,mem=1G node,nodeid=1,cpus=4-5,0", 8)
    assert cells == [NumaCell(0, "1,3,7", 1024), NumaCell(1, "4-5,0", None)]


def test_numa_ranges_continue_the_cpu_list():
    cells = parse_numa("node,nodeid=0,cpus=1,3,7 node,nodeid=1,cpus=0,2,4-6", 8)
    assert cells == [NumaCell(0, "1,3,7", None), NumaCell(1, "0,2,4-6", None)]


def test_numa_repeated_cpus_is_not_silently_dropped():
    try:
        cells = parse_numa("node,nodeid=0,cpus=0,cpus=2 node,nodeid=1,cpus=1,cpus=3", 4)
    except SpecError:
        return  # rejecting the repeated key would be fine too
    assert [c.cpus.replace(" ", "") for c in cells] == ["0,2", "1,3"]


def test_numa_node_ids_default_to_position():
    assert parse_numa("node,cpus=0 node,cpus=1", 2) == [
        NumaCell(0, "0", None),
        NumaCell(1, "1", None),
    ]


def test_numa_list_of_mappings():
    cells = parse_numa(
        [{"nodeid": 0, "cpus": "0-1", "mem": "512M"}, {"nodeid": 1, "cpus": "2-3", "memory": 512}],
        4,
    )
    assert cells == [NumaCell(0, "0-1", 512), NumaCell(1, "2-3", 512)]


def test_numa_cpu_ids_are_checked_against_topology_maxcpus():
    s = spec(
        cpus=2,
        cpu_options="sockets=2,cores=2",
        numa="node,nodeid=0,cpus=0-1 node,nodeid=1,cpus=2-3",
    )
    assert s.cpu_topology.maxcpus == 4
    assert [c.cpus for c in s.numa] == ["0-1", "2-3"]


def test_numa_memory_may_add_up_to_memory():
    s = spec(cpus=2, memory=2048, numa="node,cpus=0,mem=1G node,cpus=1,mem=1G")
    assert [c.memory_mib for c in s.numa] == [1024, 1024]


@pytest.mark.parametrize("value", ["", None, []])
def test_empty_numa_means_none(value):
    assert spec(numa=value).numa == []


# ---- nics -------------------------------------------------------------------


def test_nic_as_network_name():
    assert spec(nics=["default"]).nics == [NicSpec(network="default")]


def test_nic_with_bridge_and_model():
    nics = spec(nics=[{"bridge": "br0", "model": "e1000"}], ip_source="qemu-agent").nics
    assert nics == [NicSpec(bridge="br0", model="e1000")]


def test_nic_with_mac_and_ip_normalises_the_mac():
    nics = spec(nics=[{"network": "default", "mac": "52:54:00:AA:BB:CC", "ip": "192.168.122.50"}])
    assert nics.nics == [NicSpec(network="default", mac="52:54:00:aa:bb:cc", ip="192.168.122.50")]


def test_several_nics_keep_their_order():
    nics = spec(nics=["default", {"bridge": "br0", "mac": MAC}, {"network": "isolated"}]).nics
    assert [(n.network, n.bridge, n.mac) for n in nics] == [
        ("default", None, None),
        (None, "br0", MAC),
        ("isolated", None, None),
    ]


# ---- deploy -----------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [{"private_key": "/root/.ssh/id_ed25519"}, {"ssh_agent": True}, {"ssh_agent": "yes"}],
)
def test_deploy_credentials_other_than_password(values):
    s = build_spec({"name": "vm1", "base_domain": "base", **values})
    assert s.deploy.enabled is True


def test_deploy_without_credentials_names_password():
    err = rejected({"name": "vm1", "base_domain": "base"}, "password")
    assert "private_key" in err.accepted
    assert "deploy: false" in err.accepted


@pytest.mark.parametrize("value", [False, "no", "false", 0])
def test_deploy_false_needs_no_credentials(value):
    s = build_spec({"name": "vm1", "base_domain": "base", "deploy": value})
    assert s.deploy.enabled is False


def test_deploy_method_none_disables_deploy_without_credentials():
    s = build_spec({"name": "vm1", "base_domain": "base", "deploy_method": "none"})
    assert s.deploy.method == "none"
    assert s.deploy.enabled is False


def test_ssh_settings():
    s = spec(ssh_username="admin", ssh_port="2222", private_key="/k")
    assert s.deploy.ssh_username == "admin"
    assert s.deploy.ssh_port == 2222
    assert s.deploy.private_key == "/k"


# ---- rejections -------------------------------------------------------------

# (profile key, bad value, expected SpecError.key, other profile values)
REJECTIONS = [
    # Proxmox-style keys that mean nothing for libvirt
    ("swap", 512, "swap", {}),
    ("swap", 0, "swap", {}),
    ("host", "hv1.example.com", "host", {}),
    ("nameserver", "1.1.1.1", "nameserver", {}),
    # identity
    ("name", "bad_name!", "name", {}),
    ("name", None, "name", {}),
    ("base_domain", None, "base_domain", {}),
    ("base_domain", "", "base_domain", {}),
    ("base_domain", ["base"], "base_domain", {}),
    ("image", "http://127.0.0.1/debian.qcow2", "image", {}),  # and base_domain
    ("image", "/no/such/x.qcow2", "image", {"base_domain": ""}),
    ("image", "debian.qcow2", "image", {"base_domain": None}),
    ("image_checksum", "sha256:" + "0" * 64, "image_checksum", {}),  # without image
    ("image_format", "qcow2", "image_format", {}),
    ("image_pool", "default", "image_pool", {}),
    # enums
    ("clone_strategy", "linked", "clone_strategy", {}),
    ("ip_source", "dhcp", "ip_source", {}),
    ("ip_source", 5, "ip_source", {}),
    ("virt_type", "xen", "virt_type", {}),
    ("virt_type", "KVM", "virt_type", {}),
    ("deploy_method", "scp", "deploy_method", {}),
    # booleans
    ("validate_xml", "maybe", "validate_xml", {}),
    ("vhost", "sometimes", "vhost", {}),
    ("autostart", "maybe", "autostart", {}),
    ("autostart", 2, "autostart", {}),
    ("onboot", "perhaps", "onboot", {}),
    ("deploy", "perhaps", "deploy", {}),
    ("ssh_agent", 1.5, "ssh_agent", {}),
    # numbers
    ("cpus", 0, "cpus", {}),
    ("cpus", "two", "cpus", {}),
    ("cpus", True, "cpus", {}),
    ("cpus", 1.5, "cpus", {}),
    ("cpus", 5000, "cpus", {}),
    ("cpuunits", 1, "cpuunits", {}),
    ("cpuunits", 262145, "cpuunits", {}),
    ("cpuunits", "lots", "cpuunits", {}),
    ("ssh_port", 0, "ssh_port", {}),
    ("ssh_port", 70000, "ssh_port", {}),
    ("ssh_port", True, "ssh_port", {}),
    ("wait_for_ip_timeout", 0, "wait_for_ip_timeout", {}),
    ("wait_for_ip_timeout", "soon", "wait_for_ip_timeout", {}),
    ("wait_for_ip_timeout", True, "wait_for_ip_timeout", {}),
    ("wait_for_ip_interval", 0.01, "wait_for_ip_interval", {}),
    # sizes
    ("memory", "63M", "memory", {}),
    ("memory", 32, "memory", {}),
    ("memory", "2XB", "memory", {}),
    ("memory", 0, "memory", {}),
    ("memory", True, "memory", {}),
    ("disk_size", "big", "disk_size", {}),
    ("disk_size", -1, "disk_size", {}),
    ("disk", "big", "disk", {}),
    ("disk", 0, "disk", {}),
    # strings
    ("keymap", "EN-US", "keymap", {}),
    ("keymap", "english", "keymap", {}),
    ("description", ["a"], "description", {}),
    ("password", {"a": 1}, "password", {}),
    # cpu_options
    ("cpu_options", "cores=2,threads=1,sockets=1,maxcpus=4", "cpu_options", {}),
    ("cpu_options", "cores=2,sockets=2,maxcpus=6", "cpu_options", {}),
    ("cpu_options", "cores=3,maxcpus=4", "cpu_options", {}),
    ("cpu_options", {"sockets": 2, "cores": 2, "maxcpus": 8}, "cpu_options", {}),
    ("cpu_options", "cores", "cpu_options", {}),
    ("cpu_options", "dies=2", "cpu_options", {}),
    ("cpu_options", 4, "cpu_options", {}),
    ("cpu_options", "cores=0", "cpu_options.cores", {}),
    ("cpu_options", "cores=two", "cpu_options.cores", {}),
    ("cpu_options", "maxcpus=5000", "cpu_options.maxcpus", {}),
    ("cpu_options", "sockets=2,cores=2", "cpus", {"cpus": 6}),
    ("cpu_options", "maxcpus=2", "cpus", {"cpus": 4}),
    # numa
    ("numa", "node,nodeid=0,cpus=0-2 node,nodeid=1,cpus=2,3", "numa", {"cpus": 4}),
    ("numa", "node,nodeid=0,cpus=0,1 node,nodeid=1,cpus=1", "numa", {"cpus": 2}),
    ("numa", "node,nodeid=0,cpus=0-1 node,nodeid=1,cpus=2-4", "numa", {"cpus": 4}),
    ("numa", "node,nodeid=0,cpus=1", "numa", {}),
    ("numa", "node,nodeid=0,cpus=0-3", "numa", {"cpus": 2, "cpu_options": "cores=2"}),
    ("numa", "node,nodeid=0,cpus=0-1 node,nodeid=0,cpus=2,3", "numa", {"cpus": 4}),
    ("numa", "node,nodeid=1,cpus=0 node,cpus=1", "numa", {"cpus": 2}),
    ("numa", "nod,nodeid=0,cpus=0", "numa", {}),
    ("numa", "node,nodeid=0,cpus=0,foo=1", "numa", {}),
    ("numa", "node,nodeid=0,3,cpus=0", "numa", {"cpus": 4}),
    ("numa", "node,nodeid=0", "numa", {}),
    ("numa", "node,nodeid=0,cpus=a-b", "numa", {}),
    ("numa", "node,nodeid=x,cpus=0", "numa.nodeid", {}),
    ("numa", "node,nodeid=256,cpus=0", "numa.nodeid", {}),
    ("numa", "node,nodeid=0,cpus=0,mem=lots", "numa.mem", {}),
    ("numa", "node,nodeid=0,cpus=0-1,mem=3G", "numa", {"cpus": 2, "memory": 2048}),
    ("numa", [{"nodeid": 0, "cpus": "0", "size": 1}], "numa", {}),
    ("numa", ["node,nodeid=0,cpus=0"], "numa", {}),
    ("numa", 3, "numa", {}),
    # nics
    ("nics", "default", "nics", {}),
    ("nics", [], "nics", {}),
    ("nics", {"network": "default"}, "nics", {}),
    ("nics", [3], "nics[0]", {}),
    # vlan is a key since session 8: on a libvirt network it is refused by its name
    ("nics", [{"network": "default", "vlan": 5}], "nics[0].vlan", {}),
    ("nics", [{"network": "default", "bridge": "br0"}], "nics[0]", {}),
    ("nics", [{}], "nics[0]", {}),
    ("nics", ["default", {"mac": MAC}], "nics[1]", {}),
    ("nics", [{"network": "default", "mac": "zz"}], "nics[0].mac", {}),
    ("nics", [{"network": "default", "mac": "52-54-00-12-34-56"}], "nics[0].mac", {}),
    ("nics", [{"network": "default", "mac": "01:00:5e:00:00:01"}], "nics[0].mac", {}),
    ("nics", [{"network": "default", "mac": "FF:FF:FF:FF:FF:FF"}], "nics[0].mac", {}),
    (
        "nics",
        [{"network": "a", "mac": MAC}, {"bridge": "br0", "mac": MAC.upper()}],
        "nics[1].mac",
        {},
    ),
    ("nics", [{"network": "default", "ip": "192.168.122.50"}], "nics[0].ip", {}),
    ("nics", [{"network": "default", "mac": MAC, "ip": "x"}], "nics[0].ip", {}),
    ("nics", [{"network": "default", "mac": MAC, "ip": "127.0.0.1"}], "nics[0].ip", {}),
    ("nics", [{"network": "default", "mac": MAC, "ip": "0.0.0.0"}], "nics[0].ip", {}),
    ("nics", [{"network": "default", "mac": MAC, "ip": "224.0.0.1"}], "nics[0].ip", {}),
    ("nics", [{"network": "default", "mac": MAC, "ip": "169.254.1.1"}], "nics[0].ip", {}),
    ("nics", [{"network": "default", "mac": MAC, "ip": "2001:db8::1"}], "nics[0].ip", {}),
    pytest.param(
        "nics",
        [{"network": "default", "mac": MAC, "ip": "255.255.255.255"}],
        "nics[0].ip",
        {},
        id="nics-broadcast-ip",
    ),
    pytest.param(
        "nics",
        [{"network": "default", "model": "rtl"}],
        "nics[0].model",
        {},
        id="nics-bad-model-key",
    ),
    pytest.param(
        "nics",
        [{"network": ["default"]}],
        "nics[0].network",
        {},
        id="nics-bad-network-key",
    ),
    pytest.param(
        "numa",
        "node,nodeid=0,cpus=3-1",
        "numa",
        {"cpus": 4},
        id="numa-descending-range",
    ),
]


def _row_id(row):
    key, value, error_key, extra = row
    return f"{key}={value!r}"[:60] + (f"+{sorted(extra)}" if extra else "")


@pytest.mark.parametrize(
    "key,value,error_key,extra",
    REJECTIONS,
    ids=[None if hasattr(r, "marks") else _row_id(r) for r in REJECTIONS],
)
def test_rejected(key, value, error_key, extra):
    rejected({**MINIMAL, **extra, key: value}, error_key)


@pytest.mark.parametrize(
    "key,value",
    [("swap", ""), ("swap", None), ("host", ""), ("nameserver", None), ("image", "")],
)
def test_empty_rejected_keys_are_ignored(key, value):
    assert spec(**{key: value}).name == "vm1"


def test_image_replaces_base_domain():
    s = build_spec(
        {
            "name": "vm1",
            "image": "http://127.0.0.1/debian.qcow2",
            "image_checksum": "sha256:" + "ab" * 32,
            "password": "pw",
        }
    )
    assert s.base_domain is None
    assert s.image.source == "http://127.0.0.1/debian.qcow2"
    assert str(s.image.checksum) == "sha256:" + "ab" * 32
    assert (s.image.format, s.image.pool) == ("auto", "default")
    assert spec().image is None


@pytest.mark.parametrize(
    ("keys", "field", "suggestion"),
    [
        ({"memroy"}, "memroy", "'memory'"),
        ({"base_domian", "url"}, "base_domian", "'base_domain'"),
        ({"cpu"}, "cpu", "'cpus'"),
        ({"ssh_user"}, "ssh_user", "'ssh_username'"),
    ],
)
def test_a_key_one_typo_away_from_ours_is_refused_by_name(keys, field, suggestion):
    with pytest.raises(
        SpecError, match=rf"^{field}: is not a key salt-kvm reads; did you mean {suggestion}"
    ):
        check_key_typos(keys, ("memory", "base_domain", "cpus", "ssh_username", "url"))


def test_keys_unlike_ours_and_salt_clouds_lookalikes_pass():
    check_key_typos(
        {"memory", "make_master", "priv_key", "win_password", "location", "size", "extends"},
        ("memory", "private_key", "password"),
    )


@pytest.mark.parametrize("key", ["minion", "grains"])
def test_minion_and_grains_must_be_mappings(key):
    check_mapping(key, {"master": "m"})
    check_mapping(key, None)
    with pytest.raises(SpecError, match=rf"^{key}: 'master: m' is not a mapping"):
        check_mapping(key, "master: m")


def test_the_spec_alone_knows_the_profile_keys():
    from salt_kvm.cloud import spec

    # Every top-level default is a profile key (nic_model is nics[].model's).
    assert set(spec.DEFAULTS) - {"nic_model"} <= set(spec.PROFILE_KEYS)
    assert not set(spec.PROFILE_KEYS) & set(spec.DEPLOY_KEYS)
    # salt-cloud's deploy settings are the spec's too (nothing downstream reads vm_)
    assert set(spec.DEPLOY_SETTING_DEFAULTS) <= set(spec.DEPLOY_SETTING_KEYS)
    assert not set(spec.DEPLOY_SETTING_KEYS) & set(spec.PROFILE_KEYS + spec.DEPLOY_KEYS)
    assert set(spec.KNOWN_KEYS) == set(
        spec.PROFILE_KEYS + spec.DEPLOY_SETTING_KEYS + spec.DEPLOY_KEYS
    )

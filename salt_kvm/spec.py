"""Profile → validated VM spec. Every error names the key and what it accepts.

The cloud driver hands ``build_spec`` a plain dict of profile values; nothing
downstream reads the raw profile again.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from . import addresses, clone, connection, names
from .errors import SpecError
from .units import GIB, MIB, parse_size

DEFAULTS = {
    # Salt 3007's driver defaults, kept for drop-in compatibility.
    "clone_strategy": clone.STRATEGY_FULL,
    "ip_source": addresses.SOURCE_LEASE,
    "validate_xml": True,
    "wait_for_ip_timeout": 600,
    # 3007 polled every 10 s; we poll fast unless the profile says otherwise.
    "wait_for_ip_interval": 0.5,
    "ssh_username": "root",
    "ssh_port": 22,
    "deploy": True,
    "deploy_method": "ssh",
    "nic_model": "virtio",
}
DEPLOY_METHODS = ("ssh", "none")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3", "ne2k_pci", "pcnet")
NIC_KEYS = ("network", "bridge", "mac", "ip", "model")
CPU_OPTION_KEYS = ("cores", "threads", "sockets", "maxcpus")
KEYMAP_RE = re.compile(r"^[a-z]{2}(-[a-z]{2,5})?$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Proxmox-style keys from Salt's old docs that have no libvirt meaning here.
REJECTED = {
    "swap": "libvirt guests have no hypervisor-side swap; make swap inside the guest "
    "(a swap file or partition, e.g. from cloud-init)",
    "host": "one provider is one hypervisor: point the profile's provider at the host's "
    "libvirt url (qemu+ssh://user@host/system)",
    "nameserver": "the guest's resolver comes from DHCP on its network; set DNS on the "
    "libvirt network (<dns><forwarder>) or inside the guest",
}


@dataclass
class CpuTopology:
    sockets: int
    cores: int
    threads: int
    maxcpus: int


@dataclass
class NumaCell:
    id: int
    cpus: str
    memory_mib: int | None


@dataclass
class NicSpec:
    network: str | None = None
    bridge: str | None = None
    mac: str | None = None
    ip: str | None = None
    model: str = "virtio"


@dataclass
class DeploySpec:
    method: str = "ssh"
    enabled: bool = True
    ssh_username: str = "root"
    ssh_port: int = 22
    password: str | None = None
    private_key: str | None = None
    ssh_agent: bool = False


@dataclass
class VMSpec:
    name: str
    base_domain: str
    clone_strategy: str
    virt_type: str
    ip_source: str
    validate_xml: bool
    wait_for_ip_timeout: float
    wait_for_ip_interval: float
    cpus: int | None = None
    cpu_topology: CpuTopology | None = None
    numa: list[NumaCell] = field(default_factory=list)
    memory_mib: int | None = None
    disk_size: int | None = None
    description: str | None = None
    autostart: bool = False
    keymap: str | None = None
    vhost: bool = False
    cpu_shares: int | None = None
    nics: list[NicSpec] | None = None
    deploy: DeploySpec = field(default_factory=DeploySpec)


# ---- small checkers -------------------------------------------------------


def _bool(values: dict, key: str, default: bool) -> bool:
    value = values.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in (
        "true",
        "yes",
        "on",
        "1",
        "false",
        "no",
        "off",
        "0",
    ):
        return value.lower() in ("true", "yes", "on", "1")
    raise SpecError(key, f"{value!r} is not a boolean", "true, false (or yes/no, 1/0)")


def _int(value: Any, key: str, low: int, high: int | None = None) -> int:
    accepted = f"a whole number from {low}" + (f" to {high}" if high is not None else "")
    if isinstance(value, bool):
        raise SpecError(key, f"{value!r} is not a number", accepted)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SpecError(key, f"{value!r} is not a number", accepted) from None
    if isinstance(value, float) and value != number:
        raise SpecError(key, f"{value!r} is not a whole number", accepted)
    if number < low or (high is not None and number > high):
        raise SpecError(key, f"{value!r} is out of range", accepted)
    return number


def _seconds(value: Any, key: str, minimum: float) -> float:
    accepted = f"a number of seconds, at least {minimum:g}"
    if isinstance(value, bool):
        raise SpecError(key, f"{value!r} is not a number of seconds", accepted)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SpecError(key, f"{value!r} is not a number of seconds", accepted) from None
    if number < minimum:
        raise SpecError(key, f"{value!r} is too small", accepted)
    return number


def _str(values: dict, key: str, required: bool = False, label: str | None = None) -> str | None:
    label = label or key
    value = values.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(label, "is required", "a non-empty string")
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise SpecError(label, f"{value!r} is not a string", "a string")
    return str(value)


def _one_of(values: dict, key: str, choices: tuple, default: Any, label: str | None = None) -> Any:
    value = values.get(key, default)
    if value is None:
        value = default
    if value not in choices:
        raise SpecError(label or key, f"{value!r} is not allowed", choices)
    return value


# ---- composite values ------------------------------------------------------


def parse_cpu_options(value: Any, cpus: int | None, key: str = "cpu_options") -> CpuTopology:
    """``"cores=2,threads=2,sockets=1,maxcpus=4"`` (SlapOS/QEMU -smp) or a dict."""
    accepted = "cores=N,threads=N,sockets=N,maxcpus=N (any subset), or a mapping of those keys"
    if isinstance(value, str):
        items = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, number = part.partition("=")
            if not sep:
                raise SpecError(key, f"{part!r} is not key=value", accepted)
            items[name.strip()] = number.strip()
    elif isinstance(value, dict):
        items = dict(value)
    else:
        raise SpecError(key, f"{value!r} is not a CPU option string", accepted)
    unknown = set(items) - set(CPU_OPTION_KEYS)
    if unknown:
        raise SpecError(key, f"unknown option(s) {', '.join(sorted(unknown))}", CPU_OPTION_KEYS)
    nums = {k: _int(v, f"{key}.{k}", 1, 4096) for k, v in items.items()}
    maxcpus = nums.get("maxcpus")
    threads = nums.get("threads", 1)
    cores = nums.get("cores")
    sockets = nums.get("sockets")
    total = maxcpus or cpus or (sockets or 1) * (cores or 1) * threads
    if cores is None and sockets is None:
        sockets, cores = 1, max(1, total // threads)
    elif cores is None:
        cores = max(1, total // (sockets * threads))
    elif sockets is None:
        sockets = max(1, total // (cores * threads))
    maxcpus = maxcpus or sockets * cores * threads
    if sockets * cores * threads != maxcpus:
        raise SpecError(
            key,
            f"sockets*cores*threads = {sockets}*{cores}*{threads} does not equal maxcpus {maxcpus}",
            "values whose product equals maxcpus",
        )
    if cpus is not None and cpus > maxcpus:
        raise SpecError(
            "cpus",
            f"{cpus} is more than the {maxcpus} vCPUs of cpu_options "
            f"(sockets*cores*threads = {sockets}*{cores}*{threads})",
            f"at most {maxcpus}, or a larger cpu_options topology",
        )
    return CpuTopology(sockets, cores, threads, maxcpus)


_CPU_LIST_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def _cpu_ids(cpus: str, key: str) -> set[int]:
    ids: set[int] = set()
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        if int(high or low) < int(low):
            raise SpecError(key, f"CPU range {part!r} runs backwards", "ranges like 0-3")
        ids.update(range(int(low), int(high or low) + 1))
    return ids


def parse_numa(value: Any, vcpus: int, key: str = "numa") -> list[NumaCell]:
    """``"node,nodeid=0,cpus=0-1 node,nodeid=1,cpus=2-3"`` (QEMU -numa, as SlapOS) or a list."""
    accepted = "space-separated node,nodeid=N,cpus=LIST[,mem=SIZE] items, or a list of mappings"
    if isinstance(value, str):
        entries = []
        for word in value.split():
            parts = word.split(",")
            if parts[0] != "node":
                raise SpecError(key, f"{word!r} does not start with 'node'", accepted)
            entry: dict[str, str] = {}
            for part in parts[1:]:
                name, sep, val = part.partition("=")
                if not sep:
                    # "cpus=1,3,7" or "cpus=0,4-6": a bare CPU (range) continues the list
                    if _CPU_LIST_RE.match(part) and "cpus" in entry:
                        entry["cpus"] += "," + part
                        continue
                    raise SpecError(key, f"{part!r} in {word!r} is not key=value", accepted)
                if name == "cpus" and "cpus" in entry:
                    entry["cpus"] += "," + val  # QEMU's repeated cpus= adds CPUs
                    continue
                if name in entry:
                    raise SpecError(key, f"{name!r} is given twice in {word!r}", accepted)
                entry[name] = val
            entries.append(entry)
    elif isinstance(value, list):
        entries = value
    else:
        raise SpecError(key, f"{value!r} is not a NUMA layout", accepted)
    cells, seen_ids, seen_cpus = [], set(), set()
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) - {"nodeid", "cpus", "mem", "memory"}:
            raise SpecError(key, f"{entry!r} has unknown fields", "nodeid, cpus, mem")
        node_id = _int(entry.get("nodeid", len(cells)), f"{key}.nodeid", 0, 255)
        cpus = str(entry.get("cpus", "")).replace(" ", "")
        if not _CPU_LIST_RE.match(cpus):
            raise SpecError(
                key, f"cpus {cpus!r} of node {node_id} is not a CPU list", "e.g. 0-3 or 1,3,7"
            )
        ids = _cpu_ids(cpus, key)
        if node_id in seen_ids:
            raise SpecError(key, f"node id {node_id} is used twice", "distinct node ids")
        if ids & seen_cpus:
            raise SpecError(
                key, f"CPUs {sorted(ids & seen_cpus)} are in two nodes", "disjoint CPU lists"
            )
        if max(ids) >= vcpus:
            raise SpecError(
                key,
                f"node {node_id} names CPU {max(ids)} but the guest has {vcpus} vCPUs",
                f"CPU ids from 0 to {vcpus - 1}",
            )
        mem = entry.get("mem", entry.get("memory"))
        mem_mib = None
        if mem is not None:
            mem_bytes = parse_size(mem, f"{key}.mem", MIB)
            if mem_bytes % MIB:
                raise SpecError(
                    f"{key}.mem", f"{mem!r} is not a whole number of MiB", "e.g. 512M, 1G"
                )
            mem_mib = mem_bytes // MIB
        seen_ids.add(node_id)
        seen_cpus |= ids
        cells.append(NumaCell(node_id, cpus, mem_mib))
    return cells


def parse_nics(value: Any, key: str = "nics") -> list[NicSpec]:
    accepted = "a list of network names or mappings with network|bridge, mac, ip, model"
    if not isinstance(value, list) or not value:
        raise SpecError(key, f"{value!r} is not a list of NICs", accepted)
    nics, macs = [], set()
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if isinstance(item, str):
            item = {"network": item}
        if not isinstance(item, dict):
            raise SpecError(where, f"{item!r} is not a NIC", accepted)
        unknown = set(item) - set(NIC_KEYS)
        if unknown:
            raise SpecError(where, f"unknown key(s) {', '.join(sorted(unknown))}", NIC_KEYS)
        if bool(item.get("network")) == bool(item.get("bridge")):
            raise SpecError(where, "needs exactly one of network or bridge", ("network", "bridge"))
        nic = NicSpec(
            network=_str(item, "network", label=f"{where}.network"),
            bridge=_str(item, "bridge", label=f"{where}.bridge"),
            model=_one_of(item, "model", NIC_MODELS, DEFAULTS["nic_model"], f"{where}.model"),
        )
        if item.get("mac") is not None:
            mac = str(item["mac"]).lower()
            if not MAC_RE.match(mac) or int(mac[:2], 16) & 1:
                raise SpecError(
                    f"{where}.mac",
                    f"{item['mac']!r} is not a unicast MAC address",
                    "six colon-separated hex bytes, e.g. 52:54:00:12:34:56",
                )
            if mac in macs:
                raise SpecError(f"{where}.mac", f"{mac} is used twice", "distinct MACs")
            macs.add(mac)
            nic.mac = mac
        if item.get("ip") is not None:
            try:
                ip = ipaddress.ip_address(str(item["ip"]))
            except ValueError:
                raise SpecError(
                    f"{where}.ip",
                    f"{item['ip']!r} is not an IP address",
                    "an IPv4 address such as 192.168.122.50",
                ) from None
            if ip.version != 4 or not addresses.usable(str(ip)):
                raise SpecError(f"{where}.ip", f"{ip} cannot be reserved", "a unicast IPv4 address")
            if nic.mac is None:
                raise SpecError(
                    f"{where}.ip",
                    "a fixed ip needs a fixed mac to reserve it for",
                    "mac and ip together",
                )
            nic.ip = str(ip)
        nics.append(nic)
    return nics


def _check_numa_memory(numa: list[NumaCell], memory_mib: int | None) -> None:
    """Cells with fixed sizes need the total, and must leave room for the others."""
    fixed = [c for c in numa if c.memory_mib is not None]
    if not fixed:
        return  # the memory is shared evenly among the cells
    if memory_mib is None:
        raise SpecError(
            "memory",
            "is required when numa cells give their own mem",
            "memory in MiB or as 2G, covering all cells",
        )
    given = sum(c.memory_mib for c in fixed)
    flexible = len(numa) - len(fixed)
    left = memory_mib - given
    if left < 0 or (flexible and left < flexible) or (not flexible and left != 0):
        raise SpecError(
            "numa",
            f"cells with mem take {given} MiB of memory {memory_mib} MiB, leaving {left} MiB "
            f"for {flexible} other cell(s)",
            "cell sizes adding up to memory (or less, with cells without mem sharing the rest)",
        )


# ---- the whole profile -----------------------------------------------------


def build_spec(values: dict) -> VMSpec:
    """Validate a profile's values (after salt-cloud merged provider and profile)."""
    for key, why in REJECTED.items():
        if values.get(key) not in (None, ""):
            raise SpecError(key, f"is not supported: {why}", "leave it out")

    name = names.check_vm_name(values.get("name"))
    if values.get("image") not in (None, ""):
        raise SpecError(
            "image",
            "building guests from an image URL or file is not supported yet",
            "base_domain: the name of a shut-off domain to clone",
        )
    base = _str(values, "base_domain", required=True)
    cpus_value = values.get("cpus")
    cpus = _int(cpus_value, "cpus", 1, 4096) if cpus_value is not None else None
    topology = None
    if values.get("cpu_options") not in (None, ""):
        topology = parse_cpu_options(values["cpu_options"], cpus)
    vcpus = topology.maxcpus if topology else (cpus or 1)
    numa = parse_numa(values["numa"], vcpus) if values.get("numa") not in (None, "", []) else []

    memory = values.get("memory")
    memory_mib = parse_size(memory, "memory", MIB) // MIB if memory is not None else None
    if memory_mib is not None and memory_mib < 64:
        raise SpecError("memory", f"{memory!r} is less than 64 MiB", "at least 64 (MiB) or 64M")
    if numa and memory_mib is not None:
        given = sum(c.memory_mib or 0 for c in numa)
        if given > memory_mib:
            raise SpecError(
                "numa",
                f"cells ask {given} MiB, more than memory {memory_mib} MiB",
                "cell sizes adding up to at most memory",
            )

    disk_size = None
    for key in ("disk_size", "disk"):  # "disk" is the Proxmox-style name, in GiB
        if values.get(key) is not None:
            disk_size = parse_size(values[key], key, GIB)
            break

    description = _str(values, "description") or _str(values, "desc")
    autostart = _bool(values, "autostart", _bool(values, "onboot", False))
    keymap = _str(values, "keymap")
    if keymap is not None and not KEYMAP_RE.match(keymap):
        raise SpecError("keymap", f"{keymap!r} is not a keymap", "e.g. en-us, fr, de-ch")
    cpuunits = values.get("cpuunits")
    cpu_shares = _int(cpuunits, "cpuunits", 2, 262144) if cpuunits is not None else None

    nics = parse_nics(values["nics"]) if values.get("nics") is not None else None

    deploy_method = _one_of(values, "deploy_method", DEPLOY_METHODS, DEFAULTS["deploy_method"])
    deploy = DeploySpec(
        method=deploy_method,
        enabled=_bool(values, "deploy", DEFAULTS["deploy"]) and deploy_method != "none",
        ssh_username=_str(values, "ssh_username") or DEFAULTS["ssh_username"],
        ssh_port=_int(values.get("ssh_port", DEFAULTS["ssh_port"]), "ssh_port", 1, 65535),
        password=_str(values, "password"),
        private_key=_str(values, "private_key"),
        ssh_agent=_bool(values, "ssh_agent", False),
    )
    if deploy.enabled and not (deploy.password or deploy.private_key or deploy.ssh_agent):
        raise SpecError(
            "password",
            "an SSH deploy needs credentials",
            "password, private_key (a key file) or ssh_agent: true; or deploy: false",
        )

    return VMSpec(
        name=name,
        base_domain=base,
        clone_strategy=_one_of(
            values, "clone_strategy", clone.STRATEGIES, DEFAULTS["clone_strategy"]
        ),
        virt_type=connection.check_virt_type(values.get("virt_type")),
        ip_source=addresses.check_source(values.get("ip_source") or DEFAULTS["ip_source"]),
        validate_xml=_bool(values, "validate_xml", DEFAULTS["validate_xml"]),
        wait_for_ip_timeout=_seconds(
            values.get("wait_for_ip_timeout", DEFAULTS["wait_for_ip_timeout"]),
            "wait_for_ip_timeout",
            1,
        ),
        wait_for_ip_interval=_seconds(
            values.get("wait_for_ip_interval", DEFAULTS["wait_for_ip_interval"]),
            "wait_for_ip_interval",
            0.1,
        ),
        cpus=cpus,
        cpu_topology=topology,
        numa=numa,
        memory_mib=memory_mib,
        disk_size=disk_size,
        description=description,
        autostart=autostart,
        keymap=keymap,
        vhost=_bool(values, "vhost", False),
        cpu_shares=cpu_shares,
        nics=nics,
        deploy=deploy,
    )

"""Profile → validated VM spec. Every error names the key and what it accepts.

The cloud driver hands ``build_spec`` a plain dict of profile values; nothing
downstream reads the raw profile again.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from salt_kvm.cloud import choices, cloudinit, features, saltsource, sshdeploy
from salt_kvm.cloud import shares as profile_shares
from salt_kvm.cloud.features import GuestFeatures
from salt_kvm.cloud.hostdevs import HostdevSpec, check_allowed, parse_allowed, parse_hostdevs
from salt_kvm.cloud.nics import (  # noqa: F401 - re-exported: the names' old home
    MAC_RE,
    NIC_KEYS,
    NIC_MODELS,
    NicSpec,
    check_plan,
    parse_nics,
)
from salt_kvm.cloud.topology import CpuTopology, NumaCell, parse_cpu_options, parse_numa
from salt_kvm.disks.spec import ProfileDisks
from salt_kvm.disks.spec import parse_profile as parse_profile_disks
from salt_kvm.errors import SpecError
from salt_kvm.images import spec as images
from salt_kvm.nat import rules as nat
from salt_kvm.virt import choices as virt_choices
from salt_kvm.virt import names
from salt_kvm.virt.checks import boolean, object_name, one_of, seconds, text, whole_number
from salt_kvm.virt.units import GIB, MIB, parse_size

# Every key of a profile (or its provider) that build_spec reads: the driver
# passes these, and only these, from salt-cloud's VM dict.
PROFILE_KEYS = (
    "base_domain",
    "clone_strategy",
    "virt_type",
    "ip_source",
    "validate_xml",
    "wait_for_ip_timeout",
    "wait_for_ip_interval",
    "cpus",
    "cpu_options",
    "numa",
    "memory",
    "disk_size",
    "disk",
    "description",
    "desc",
    "autostart",
    "onboot",
    "keymap",
    "vhost",
    "cpuunits",
    "nics",
    "hostdevs",
    "hostdev_allowed",
    "deploy",
    "deploy_method",
    "salt_source",
    "salt_version",
    "ssh_username",
    "ssh_port",
    "password",
    "private_key",
    "ssh_agent",
    "known_hosts_file",
    "image",
    "image_checksum",
    "image_format",
    "image_pool",
    "image_allowed_dirs",
    "cloud_init",
    "swap",
    "host",
    "nameserver",
    "nat_rules",
    "disks",
    "delete_disks",
    "disk_allowed_dirs",
    *features.KEYS,
    "shares",
    "share_allowed_dirs",
)


# salt-cloud's deploy settings build_spec reads too: the driver looks them up
# as salt-cloud's own deploy does, in the profile, provider and master config.
DEPLOY_SETTING_KEYS = (
    "script",
    "script_args",
    "deploy_command",
    "force_minion_config",
    "keysize",
    "sudo",
    "sudo_password",
    "tmp_dir",
    "wait_for_minion_timeout",
    "bootstrap_script_url",
)

# Keys read besides the spec's: the connection (url, or hosts and location:
# salt_kvm.cloud.locations), the action's stop_timeout, and
# the minion's config and grains (Salt's helpers build the minion config from
# them, salt_kvm.saltutil). A key in none is a typo when it is close to one.
DEPLOY_KEYS = (
    "url",
    "hosts",
    "location",
    "libvirt_username",
    "libvirt_password",
    "minion",
    "grains",
    "stop_timeout",
)
# Every key a profile or its provider may hold.
KNOWN_KEYS = PROFILE_KEYS + DEPLOY_SETTING_KEYS + DEPLOY_KEYS


DEFAULTS: dict[str, Any] = {
    # Salt 3007's driver defaults, kept for drop-in compatibility.
    "clone_strategy": choices.STRATEGY_FULL,
    "ip_source": choices.SOURCE_LEASE,
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
# salt-cloud's defaults for its deploy settings (DEPLOY_SETTING_KEYS).
DEPLOY_SETTING_DEFAULTS: dict[str, Any] = {
    "script": "bootstrap-salt",
    "keysize": 2048,
    "wait_for_minion_timeout": 300,
}
DEPLOY_METHODS = ("ssh", "cloud-init", "none")
# Where a tmp_dir the deploy works in exactly (and removes) may be.
TMP_DIR_PARENTS = ("/tmp/", "/var/tmp/")
KEYMAP_RE = re.compile(r"[a-z]{2}(-[a-z]{2,5})?")
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
class DeploySpec:
    method: str = "ssh"
    enabled: bool = True
    ssh_username: str = "root"
    ssh_port: int = 22
    password: str | None = None
    private_key: str | None = None
    ssh_agent: bool = False
    # salt-cloud's key: the guest's host key must already be in this file.
    known_hosts_file: str | None = None
    # salt-cloud's deploy settings, as salt-cloud reads them.
    script: str = "bootstrap-salt"
    script_args: str | None = None
    deploy_command: str | None = None
    force_minion_config: bool = False
    keysize: int = 2048
    sudo: bool = False
    sudo_password: str | None = None
    tmp_dir: str | None = None
    # Seconds to wait for the minion's start event (0: do not wait).
    minion_timeout: float = 300
    # Where a guest whose image has no Salt gets it (None: the image has it).
    salt_source: saltsource.SaltSource | None = None


@dataclass
class VMSpec:
    name: str
    base_domain: str | None
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
    hostdevs: list[HostdevSpec] = field(default_factory=list)
    hostdev_allowed: list[HostdevSpec] = field(default_factory=list)  # the provider's
    deploy: DeploySpec = field(default_factory=DeploySpec)
    image: images.ImageSpec | None = None
    cloud_init: cloudinit.CloudInitSpec | None = None
    nat_rules: list[nat.Rule] = field(default_factory=list)
    disks: ProfileDisks = field(default_factory=ProfileDisks)
    features: GuestFeatures = field(default_factory=GuestFeatures)
    shares: tuple[profile_shares.ShareSpec, ...] = ()
    share_allowed_dirs: tuple[str, ...] = ()


# ---- the whole profile -----------------------------------------------------

IMAGE_KEYS = ("image_checksum", "image_format", "image_pool")  # image_allowed_dirs: provider-wide


def _base_or_image(values: dict) -> tuple[str | None, images.ImageSpec | None]:
    """A guest is cloned from a base domain or built on an image, never both."""
    has_image = values.get("image") not in (None, "")
    base = object_name(values, "base_domain")
    if has_image and base:
        raise SpecError(
            "image", "base_domain and image exclude each other", ("base_domain", "image")
        )
    if has_image:
        return None, images.parse_image(values)
    for key in IMAGE_KEYS:
        if values.get(key) not in (None, ""):
            raise SpecError(key, "only applies with image", "image: a URL or file, or leave it out")
    if not base:
        raise SpecError(
            "base_domain",
            "is required (or image)",
            "base_domain: a shut-off domain to clone, or image: a disk image URL or file",
        )
    return base, None


# salt-cloud's own keys that look like one of ours but are not typos of it.
SALT_CLOUD_LOOKALIKES = ("priv_key", "win_password")


# Keys that widen what the hypervisor exposes: its operator sets them (provider
# or master configuration), never a profile, which a requester may write.
HYPERVISOR_KEYS = (
    "disk_allowed_dirs",
    "image_allowed_dirs",
    "share_allowed_dirs",
    "hostdev_allowed",
    "graphics_listen_allowed",
)
# What a profile could take of the host with each, when the profile set it.
HYPERVISOR_KEY_RISKS = {
    "hostdev_allowed": "take any device from the host for its guest",
    "graphics_listen_allowed": "open its console on any address of the host",
}


def check_written_keys(profile: dict, provider: dict) -> None:
    """The keys the user wrote for a VM (its profile's and its provider's):
    none of the hypervisor's in the profile, none a typo of a known key."""
    for key in HYPERVISOR_KEYS:
        if key in profile:
            raise SpecError(
                key,
                "is the hypervisor's setting, not a profile's: a profile could "
                + HYPERVISOR_KEY_RISKS.get(key, "open any host directory to its guest"),
                f"{key} in the provider configuration (cloud.providers.d), or leave it out",
            )
    check_key_typos(set(profile) | set(provider), KNOWN_KEYS)


def check_key_typos(keys: Iterable[str], known: Iterable[str]) -> None:
    """Refuse a key that is not one we read but is one letter or two away from
    one (``memroy``, ``cpu``): left alone it would be ignored silently and the
    guest made with the default. Keys unlike any of ours pass (salt-cloud's
    own, other tools'); a key that is not a string (YAML's ``1:``) is no one's."""
    known = tuple(known)
    keys = tuple(keys)
    for odd in keys:
        if not isinstance(odd, str):  # YAML's `1: x`, `true: y`, `null:`
            raise SpecError(
                str(odd),
                f"{odd!r} is not a string (YAML read it as {type(odd).__name__}): no key "
                "salt-kvm or salt-cloud reads",
                "key names (quote a key that looks like a number or true/false)",
            )
    for key in sorted(keys):
        if key in known or key in SALT_CLOUD_LOOKALIKES:
            continue
        close = difflib.get_close_matches(key, known, 1, 0.8)
        if close:
            raise SpecError(
                key,
                f"is not a key salt-kvm reads; did you mean {close[0]!r}?",
                f"{close[0]} (or remove {key})",
            )


def check_mapping(key: str, value: Any) -> None:
    """``minion`` and ``grains`` are YAML mappings written into the guest."""
    if value is not None and not isinstance(value, dict):
        raise SpecError(
            key, f"{value!r} is not a mapping", "option: value lines indented under the key"
        )


def _deploy_settings(deploy: DeploySpec, values: dict) -> None:
    """salt-cloud's deploy settings, taken as salt-cloud takes them, with
    their types checked: they end up in shell commands on the guest."""
    deploy.script = text(values, "script") or DEPLOY_SETTING_DEFAULTS["script"]
    deploy.script_args = text(values, "script_args")
    deploy.deploy_command = text(values, "deploy_command")
    deploy.force_minion_config = boolean(values, "force_minion_config", False)
    keysize = values.get("keysize")
    deploy.keysize = (
        DEPLOY_SETTING_DEFAULTS["keysize"]
        if keysize in (None, "")
        else whole_number(keysize, "keysize", 2048, 16384)
    )
    deploy.sudo = boolean(values, "sudo", deploy.ssh_username != "root")
    deploy.sudo_password = text(values, "sudo_password") or deploy.password
    deploy.tmp_dir = text(values, "tmp_dir")
    if deploy.tmp_dir is not None and (
        not deploy.tmp_dir.startswith("/") or any(c.isspace() for c in deploy.tmp_dir)
    ):
        raise SpecError(
            "tmp_dir", f"{deploy.tmp_dir!r} is not an absolute path", "/path/without/spaces"
        )
    tmp_dir = deploy.tmp_dir
    exact = tmp_dir is not None and sshdeploy.names_tmp_dir(tmp_dir, deploy.deploy_command)
    if tmp_dir is not None and exact and not tmp_dir.rstrip("/").startswith(TMP_DIR_PARENTS):
        # the deploy empties and removes its working directory in the guest
        raise SpecError(
            "tmp_dir",
            f"{deploy.tmp_dir!r} is named by deploy_command, so the deploy works in it and "
            "removes it (rm -rf) in the guest",
            "a directory below /tmp or /var/tmp, e.g. /tmp/.saltcloud",
        )
    deploy.minion_timeout = seconds(
        values.get("wait_for_minion_timeout", DEPLOY_SETTING_DEFAULTS["wait_for_minion_timeout"]),
        "wait_for_minion_timeout",
        0,
    )


def _ssh_username(values: dict) -> str:
    """A user name goes into SSH's login and ``sudo``: no spaces around or in it."""
    username = text(values, "ssh_username") or DEFAULTS["ssh_username"]
    if any(c.isspace() for c in username):
        raise SpecError(
            "ssh_username", f"{username!r} holds a space", "a user name without spaces (root)"
        )
    return username


def _check_network_config(
    nics: list[NicSpec] | None, cloud_init: cloudinit.CloudInitSpec | None
) -> None:
    """A static ip on a bridge writes the guest's network config: the profile
    cannot give another one beside it."""
    static = [i for i, n in enumerate(nics or []) if n.static]
    if static and cloud_init is not None and cloud_init.network_config is not None:
        raise SpecError(
            f"nics[{static[0]}].ip",
            "on a bridge writes the guest's network config, and cloud_init.network_config "
            "gives another one",
            "nics[].ip with prefix, gateway, dns, or cloud_init.network_config (not both)",
        )


def build_spec(values: dict) -> VMSpec:
    """Validate a profile's values (after salt-cloud merged provider and profile)."""
    for key, why in REJECTED.items():
        if values.get(key) not in (None, ""):
            raise SpecError(key, f"is not supported: {why}", "leave it out")

    name = names.check_vm_name(values.get("name"))
    base, image = _base_or_image(values)
    cpus_value = values.get("cpus")
    cpus = whole_number(cpus_value, "cpus", 1, 4096) if cpus_value is not None else None
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

    description = text(values, "description", multiline=True) or text(
        values, "desc", multiline=True
    )
    autostart = boolean(values, "autostart", boolean(values, "onboot", False))
    keymap = text(values, "keymap")
    if keymap is not None and not KEYMAP_RE.fullmatch(keymap):
        raise SpecError("keymap", f"{keymap!r} is not a keymap", "e.g. en-us, fr, de-ch")
    cpuunits = values.get("cpuunits")
    cpu_shares = whole_number(cpuunits, "cpuunits", 2, 262144) if cpuunits is not None else None

    nics = parse_nics(values["nics"]) if values.get("nics") is not None else None
    hostdevs = parse_hostdevs(values.get("hostdevs"))
    hostdev_allowed = parse_allowed(values.get("hostdev_allowed"))
    check_allowed(hostdevs, hostdev_allowed)

    deploy_method = one_of(values, "deploy_method", DEPLOY_METHODS, DEFAULTS["deploy_method"])
    deploy = DeploySpec(
        method=deploy_method,
        enabled=boolean(values, "deploy", DEFAULTS["deploy"]) and deploy_method != "none",
        ssh_username=_ssh_username(values),
        ssh_port=whole_number(values.get("ssh_port", DEFAULTS["ssh_port"]), "ssh_port", 1, 65535),
        password=text(values, "password"),
        private_key=text(values, "private_key"),
        ssh_agent=boolean(values, "ssh_agent", False),
        known_hosts_file=text(values, "known_hosts_file"),
    )
    if deploy.enabled:
        _deploy_settings(deploy, values)
    needs_ssh = deploy.enabled and deploy.method == "ssh"
    if needs_ssh and not (deploy.password or deploy.private_key or deploy.ssh_agent):
        raise SpecError(
            "password",
            "an SSH deploy needs credentials",
            "password, private_key (a key file) or ssh_agent: true; or deploy: false",
        )

    cloud_init = None
    if values.get("cloud_init") not in (None, "", {}):
        cloud_init = cloudinit.parse(values["cloud_init"])
    source_given = values.get("ip_source") not in (None, "")
    ip_source = check_plan(
        nics, choices.check_source(values.get("ip_source") or DEFAULTS["ip_source"]), source_given
    )
    _check_network_config(nics, cloud_init)
    deploy.salt_source = saltsource.parse(
        values, deploy.method, deploy.enabled, ip_source == choices.SOURCE_AGENT
    )

    share_list, share_dirs = profile_shares.parse(
        values.get("shares"), values.get("share_allowed_dirs")
    )

    return VMSpec(
        name=name,
        base_domain=base,
        clone_strategy=one_of(
            values, "clone_strategy", choices.STRATEGIES, DEFAULTS["clone_strategy"]
        ),
        virt_type=virt_choices.check_virt_type(values.get("virt_type")),
        ip_source=ip_source,
        validate_xml=boolean(values, "validate_xml", DEFAULTS["validate_xml"]),
        wait_for_ip_timeout=seconds(
            values.get("wait_for_ip_timeout", DEFAULTS["wait_for_ip_timeout"]),
            "wait_for_ip_timeout",
            1,
        ),
        wait_for_ip_interval=seconds(
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
        vhost=boolean(values, "vhost", False),
        cpu_shares=cpu_shares,
        nics=nics,
        hostdevs=hostdevs,
        hostdev_allowed=hostdev_allowed,
        deploy=deploy,
        image=image,
        cloud_init=cloud_init,
        nat_rules=nat.parse_rules(values.get("nat_rules"), "nat_rules"),
        disks=parse_profile_disks(values),
        features=features.parse(values),
        shares=share_list,
        share_allowed_dirs=share_dirs,
    )

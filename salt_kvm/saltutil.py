"""The Salt glue: the one library module (with the driver) that imports Salt.

salt-kvm's library raises its own errors (``salt_kvm.errors``); the loader
modules speak Salt. This module is where one becomes the other, once for all
of them:

- ``command_errors``: execution modules; a library error becomes
  ``CommandExecutionError`` with the same message.
- ``cloud_errors``: the cloud driver; a ``SpecError`` becomes
  ``SaltCloudConfigError``, any other library error ``SaltCloudSystemExit``.
- ``state_ret`` / ``state_failed`` / ``state_changed``: the state return
  ``{"name", "result", "changes", "comment"}``; ``STATE_ERRORS`` are what a
  state turns into ``result: False`` with the message as its comment.

It also reads salt-kvm's settings (``kvm:...``) from Salt's config and pillar,
and holds the salt-cloud helpers that build a minion's files and accept its
key (``salt_kvm.cloud`` receives their results and imports no Salt).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import salt.config
import salt.utils.cloud
from salt.exceptions import (
    CommandExecutionError,
    SaltCloudConfigError,
    SaltCloudSystemExit,
)

from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt.checks import boolean
from salt_kvm.virt.checks import uri as check_uri
from salt_kvm.virt.choices import DEFAULT_URI
from salt_kvm.virt.connection import connected

if TYPE_CHECKING:  # the driver's side only: execution modules never load salt_kvm.cloud
    from salt_kvm.cloud.deploy import MinionFiles
    from salt_kvm.cloud.spec import VMSpec

log = logging.getLogger(__name__)
CONFIG_KEY = "kvm:connection:uri"

# What a state reports as its failure: a library error, or its execution
# module's translation of one.
STATE_ERRORS = (SaltKvmError, CommandExecutionError)


# ---- errors -----------------------------------------------------------------


@contextlib.contextmanager
def command_errors(prefix: str = "", also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Inside the block, a library error (or one of ``also``, e.g.
    ``libvirt.libvirtError``) becomes ``CommandExecutionError`` with its
    message (after ``prefix``)."""
    errors: tuple[type[BaseException], ...] = (SaltKvmError, *also)
    try:
        yield
    except errors as exc:
        raise CommandExecutionError(f"{prefix}{exc}") from exc


@contextlib.contextmanager
def cloud_errors(
    config_prefix: str = "",
    exit_prefix: str = "",
    also: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Inside the block, a ``SpecError`` becomes ``SaltCloudConfigError`` (its
    message after ``config_prefix``, e.g. the profile's name), any other library
    error (or one of ``also``) ``SaltCloudSystemExit`` (after ``exit_prefix``)."""
    errors: tuple[type[BaseException], ...] = (SaltKvmError, *also)
    try:
        yield
    except SpecError as exc:
        raise SaltCloudConfigError(f"{config_prefix}{exc}") from exc
    except errors as exc:
        raise SaltCloudSystemExit(f"{exit_prefix}{exc}") from exc


@contextlib.contextmanager
def input_errors(config_prefix: str = "") -> Iterator[None]:
    """The driver's checks of its input, before anything is made: whatever the
    type of the failure (a Jinja ``TypeError`` in a template...), it is a
    ``SaltCloudConfigError`` (after ``config_prefix``); an interrupt stays one."""
    try:
        yield
    except SpecError as exc:
        raise SaltCloudConfigError(f"{config_prefix}{exc}") from exc
    except SaltCloudConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any type: the user's input caused it
        raise SaltCloudConfigError(f"{config_prefix}{type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def create_errors(
    name: str, config_prefix: str, leftovers: Callable[[], list[str]]
) -> Iterator[None]:
    """The driver's create, once it makes things: a failure says that what
    this run made was removed (``leftovers()`` rolls back and names what could
    not be); a ``SpecError`` is still a configuration error."""
    try:
        yield
    except Exception as exc:
        failed = leftovers()
        if isinstance(exc, SpecError):
            raise SaltCloudConfigError(f"{config_prefix}{exc}") from exc
        leftover = f"; could not remove: {', '.join(failed)}" if failed else ""
        raise SaltCloudSystemExit(
            f"creating {name} failed: {exc}. Everything this run created was removed{leftover}."
        ) from exc


def flag(value: Any, key: str, default: bool | None = False) -> Any:
    """An execution function's yes/no argument ``key``: a bool, or the usual
    spellings (``'false'``, ``no``, ``0``...: a quoted ``'false'`` reaches the
    function as a string, which Python finds true); ``None`` is ``default``;
    anything else is refused naming ``key``."""
    if value is None:
        return default
    with command_errors():
        return boolean({key: value}, key, False)


def profile_prefix(vm_: dict) -> str:
    """How the driver's configuration errors begin: the profile they are about."""
    return f"profile {vm_.get('profile')!r}: "


def state_ret(name: str, comment: str = "") -> dict[str, Any]:
    """A state's return before it knows anything: nothing changed, no failure."""
    return {"name": name, "result": True, "changes": {}, "comment": comment}


def state_failed(ret: dict[str, Any], error: object, prefix: str = "") -> dict[str, Any]:
    """``ret`` failed with ``error``'s message (after ``prefix``); nothing changed."""
    ret.update(result=False, comment=f"{prefix}{error}")
    return ret


def state_changed(
    ret: dict[str, Any], changes: dict[str, Any], comment: str, test: bool = False
) -> dict[str, Any]:
    """``ret`` with the changes made, or with ``test=True`` those that would be
    made (``result: None``: nothing was changed)."""
    ret.update(result=None if test else True, changes=changes, comment=comment)
    return ret


# ---- configuration ------------------------------------------------------------


def _traverse(data: dict, path: str) -> Any:
    for part in path.split(":"):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def hypervisor_uri(opts: dict, pillar: dict, uri: str | None = None) -> str:
    """An explicit ``uri``, else pillar, else minion config ``kvm:connection:uri``."""
    if uri not in (None, ""):
        return check_uri(uri, "uri")
    configured = _traverse(pillar or {}, CONFIG_KEY) or _traverse(opts or {}, CONFIG_KEY)
    return check_uri(configured, CONFIG_KEY) if configured else DEFAULT_URI


def connection_for(opts: dict, pillar: dict, uri: str | None = None):
    """A context manager holding a connection to the hypervisor the minion manages."""
    return connected(hypervisor_uri(opts, pillar, uri))


def config_value(opts: dict, pillar: dict, key: str, default: Any = None) -> Any:
    """A ``kvm:...`` setting: pillar first, then the minion config, else ``default``."""
    for source in (pillar or {}, opts or {}):
        value = _traverse(source, key)
        if value is not None:
            return value
    return default


# ---- salt-cloud's configuration ----------------------------------------------------


def profile_values(opts: dict, vm_: dict) -> dict:
    """What ``build_spec`` reads of a VM's configuration (profile, provider);
    salt-cloud's deploy settings are looked up as salt-cloud's own deploy does
    (the master config too)."""
    from salt_kvm.cloud.spec import DEPLOY_SETTING_KEYS, PROFILE_KEYS  # see TYPE_CHECKING

    values = {"name": vm_.get("name")}
    for key in PROFILE_KEYS + DEPLOY_SETTING_KEYS:
        value = salt.config.get_cloud_config_value(
            key, vm_, opts, search_global=key in DEPLOY_SETTING_KEYS
        )
        if value is not None:
            values[key] = value
    return values


def connection_args(opts: dict, source: dict) -> dict[str, Any]:
    """The libvirt connection a provider (or a VM's configuration) names."""

    def get(key: str, default: Any = None) -> Any:
        return salt.config.get_cloud_config_value(
            key, source, opts, search_global=False, default=default
        )

    return {
        "uri": check_uri(get("url", DEFAULT_URI), "url"),
        "username": get("libvirt_username"),
        "password": get("libvirt_password"),
    }


def written_config(opts: dict, vm_: dict) -> tuple[dict, dict]:
    """The profile and the provider the user wrote for this VM (``vm_`` also
    holds every master option)."""
    alias, _, driver = str(vm_.get("provider", "")).partition(":")
    provider = (opts.get("providers") or {}).get(alias, {}).get(driver or "libvirt", {})
    return (opts.get("profiles") or {}).get(vm_.get("profile")) or {}, provider


# ---- salt-cloud's side of a deploy ------------------------------------------------


def minion_id(opts: dict, vm_: dict) -> str:
    """The key id salt-cloud uses: the minion config's id (or the VM name) + append_domain."""
    minion = salt.config.get_cloud_config_value("minion", vm_, opts, default={})
    if not isinstance(minion, dict):
        minion = {}  # refused by name when the profile is checked
    key_id = minion.get("id", vm_["name"])
    if minion.get("append_domain"):
        key_id = f"{key_id}.{minion['append_domain']}"
    return key_id


def minion_files(opts: dict, vm_: dict, spec: VMSpec) -> MinionFiles:
    """The new minion's files as salt-cloud makes them: its config (a master
    is set), keys (salt-cloud's, else new ones), grains and, for an SSH
    deploy, the deploy script (found, unless ``deploy_command`` replaces it).
    ``vm_`` is read, never changed."""
    from salt_kvm.cloud.deploy import MinionFiles  # here: see TYPE_CHECKING above

    deploy = spec.deploy
    minion_conf = salt.utils.cloud.minion_config(opts, vm_)
    script = None
    if deploy.method == "ssh":
        script = salt.utils.cloud.os_script(deploy.script, vm_, opts, minion_conf)
        if not script and not deploy.deploy_command:
            raise SpecError(
                "script",
                f"no deploy script named {deploy.script!r} in {opts['deploy_scripts_search_path']}",
            )
    # salt-cloud has usually made and accepted the keys already (vm_ carries them).
    priv, pub = vm_.get("priv_key"), vm_.get("pub_key")
    if not pub or not priv:
        priv, pub = salt.utils.cloud.gen_keys(deploy.keysize)
    files = {"minion.pem": (priv.encode(), 0o600), "minion.pub": (pub.encode(), 0o600)}
    grains = minion_conf.pop("grains", {})
    if grains:
        files["grains"] = (salt.utils.cloud.salt_config_to_yaml(grains).encode(), 0o600)
    minion_conf["grains"] = {
        "salt-cloud": {
            "driver": vm_.get("driver"),
            "provider": vm_.get("provider"),
            "profile": vm_.get("profile"),
        }
    }
    files["minion"] = (salt.utils.cloud.salt_config_to_yaml(minion_conf).encode(), 0o600)
    return MinionFiles(key_id=minion_id(opts, vm_), pub=pub, files=files, script=script)


class SaltMaster:
    """The master's side of a deploy (``salt_kvm.cloud.deploy.Master``): accept
    the new minion's key, listen for its start event."""

    def __init__(self, opts: dict):
        self.opts = opts

    def accept_key(self, pub: str, key_id: str) -> None:
        salt.utils.cloud.accept_key(self.opts["pki_dir"], pub, key_id)

    def listen(self) -> Any:
        """Subscribe to the master's event bus before the minion can start."""
        try:
            import salt.utils.event

            return salt.utils.event.get_master_event(self.opts, self.opts["sock_dir"], listen=True)
        except Exception as exc:  # noqa: BLE001 - no local master: nothing to wait on
            log.warning("not waiting for the minion: no master event bus here (%s)", exc)
            return None

"""Exceptions of the salt-kvm library.

Loader modules translate them into Salt's forms (``SaltCloudConfigError``,
``CommandExecutionError``, state comments). The library does not import Salt;
only the Salt glue ``saltutil`` and the driver (``salt_kvm.clouds``) do.
"""

from __future__ import annotations

from collections.abc import Iterable


class SaltKvmError(Exception):
    """Any failure of a salt-kvm operation, with a message a user understands."""


class SpecError(SaltKvmError, ValueError):
    """A configuration value is invalid. Names the key and what is accepted."""

    def __init__(self, key: str, problem: str, accepted: str | Iterable[str] | None = None):
        self.key = key
        self.problem = problem
        if accepted is not None and not isinstance(accepted, str):
            accepted = ", ".join(str(a) for a in accepted)
        self.accepted = accepted
        message = f"{key}: {problem}"
        if accepted:
            message += f" (accepted: {accepted})"
        super().__init__(message)


class NotFoundError(SaltKvmError):
    """A domain, volume, pool or network does not exist."""


class ConflictError(SaltKvmError):
    """The request conflicts with the current state of the hypervisor."""


class ForwardsBlocked(ConflictError):
    """NAT forwards cannot pass the host's firewall (libvirt's backend, firewalld)."""


class TimeoutError_(SaltKvmError):  # noqa: N801 - avoid shadowing the builtin
    """Waiting for a guest (address, SSH, agent) took longer than allowed."""

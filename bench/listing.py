"""``salt-cloud -Q`` cost against the number of managed domains: the driver's
listing run in-process with every libvirt call counted, for 10 and 200 defined
(shut-off) managed domains."""

from __future__ import annotations

import collections
import functools
import statistics
import time

import libvirt

from salt_kvm.cloud import inventory
from salt_kvm.virt import lifecycle
from salt_kvm.virt.domain import new_domain

PREFIX = "skbench-q-"
COUNTS = (10, 200)
# Answered from the object itself, no round trip to libvirtd.
LOCAL = {"name", "UUID", "UUIDString", "ID", "connect", "c_pointer"}
CLASSES = (libvirt.virConnect, libvirt.virDomain, libvirt.virNetwork, libvirt.virStoragePool)


class CallCounter:
    """Counts the libvirt API calls (round trips) made while active."""

    def __init__(self):
        self.calls: collections.Counter[str] = collections.Counter()
        self._saved: list[tuple[type, str, object]] = []

    def __enter__(self):
        for cls in CLASSES:
            for attr, fn in list(vars(cls).items()):
                if attr.startswith("_") or attr in LOCAL or not callable(fn):
                    continue
                self._saved.append((cls, attr, fn))
                setattr(cls, attr, self._wrap(cls.__name__, attr, fn))
        return self

    def _wrap(self, owner: str, attr: str, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            self.calls[f"{owner}.{attr}"] += 1
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for cls, attr, fn in self._saved:
            setattr(cls, attr, fn)


def _define(conn: libvirt.virConnect, count: int) -> list[libvirt.virDomain]:
    doms = []
    for i in range(count):
        xml = new_domain(f"{PREFIX}{i:03d}", "qemu", 256, 1, f"/nonexistent/{PREFIX}{i}.qcow2")
        xml.interfaces[0].mac = f"52:54:00:be:{i // 256:02x}:{i % 256:02x}"
        xml.set_managed_info({"base": "bench", "strategy": "quick", "volumes": []})
        doms.append(conn.defineXML(xml.to_xml()))
    return doms


def _cleanup(conn: libvirt.virConnect) -> None:
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(PREFIX):
            lifecycle.undefine(dom)


def _cli_seconds(env) -> float:
    """Wall time of a real ``salt-cloud -Q`` (process start included)."""
    started = time.monotonic()
    env.cloud("-Q")
    return time.monotonic() - started


def run(conn: libvirt.virConnect, env=None) -> None:
    """``env``: a salt-master environment (bench.provision) to also time the CLI."""
    print("salt-cloud -Q listing (inventory.managed), calls counted in-process:")
    results = {}
    _cleanup(conn)
    if env is not None:
        _cli_seconds(env)  # warm the page cache: the first Salt start is slower
    for count in COUNTS:
        _define(conn, count)
        try:
            times = []
            for _ in range(5):
                with CallCounter() as counter:
                    started = time.monotonic()
                    nodes = inventory.managed(conn)
                    times.append(time.monotonic() - started)
            ours = [n for n in nodes if n.startswith(PREFIX)]
            assert len(ours) == count, (len(ours), count)
            total = sum(counter.calls.values())
            per_domain = {k: v for k, v in counter.calls.items() if v >= count}
            results[count] = (statistics.median(times), total, per_domain)
            others = len(nodes) - count
            print(
                f"  {count:>3} managed domains (+{others} others): "
                f"{statistics.median(times) * 1000:7.1f} ms, {total} libvirt calls "
                f"(per-domain: {dict(per_domain) or 'none'})"
            )
            if env is not None:
                print(f"      salt-cloud -Q, whole command: {_cli_seconds(env):.2f} s")
        finally:
            _cleanup(conn)
    (t_small, c_small, _), (t_large, c_large, _) = (results[c] for c in COUNTS)
    print(
        f"  {COUNTS[1]} vs {COUNTS[0]} domains: time {t_large / t_small:.1f}x, "
        f"calls {c_small} -> {c_large} ({(c_large - c_small) / (COUNTS[1] - COUNTS[0]):.2f} "
        "extra calls per added domain)"
    )

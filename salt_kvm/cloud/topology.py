"""vCPU topology and NUMA layout: the SlapOS/QEMU string forms, validated."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import check_keys, whole_number
from salt_kvm.virt.units import MIB, parse_size

CPU_OPTION_KEYS = ("cores", "threads", "sockets", "maxcpus")


@dataclass
class NumaCell:
    id: int
    cpus: str
    memory_mib: int | None


@dataclass
class CpuTopology:
    sockets: int
    cores: int
    threads: int
    maxcpus: int


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
    check_keys(items, CPU_OPTION_KEYS, key, "option(s)")
    nums = {k: whole_number(v, f"{key}.{k}", 1, 4096) for k, v in items.items()}
    wanted_max = nums.get("maxcpus")
    threads = nums.get("threads", 1)
    given_cores = nums.get("cores")
    given_sockets = nums.get("sockets")
    total = wanted_max or cpus or (given_sockets or 1) * (given_cores or 1) * threads
    if given_cores is None and given_sockets is None:
        sockets, cores = 1, max(1, total // threads)
    elif given_cores is None:
        sockets = given_sockets if given_sockets is not None else 1
        cores = max(1, total // (sockets * threads))
    elif given_sockets is None:
        cores = given_cores
        sockets = max(1, total // (cores * threads))
    else:
        sockets, cores = given_sockets, given_cores
    maxcpus = wanted_max or sockets * cores * threads
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


_CPU_LIST_RE = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*", re.ASCII)


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
                    if _CPU_LIST_RE.fullmatch(part) and "cpus" in entry:
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
    cells: list[NumaCell] = []
    seen_ids: set[int] = set()
    seen_cpus: set[int] = set()
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) - {"nodeid", "cpus", "mem", "memory"}:
            raise SpecError(key, f"{entry!r} has unknown fields", "nodeid, cpus, mem")
        node_id = whole_number(entry.get("nodeid", len(cells)), f"{key}.nodeid", 0, 255)
        cpus = str(entry.get("cpus", "")).replace(" ", "")
        if not _CPU_LIST_RE.fullmatch(cpus):
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


def check_numa_memory(numa: list[NumaCell], memory_mib: int | None) -> None:
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
    given = sum(c.memory_mib or 0 for c in fixed)  # fixed: cells that give theirs
    flexible = len(numa) - len(fixed)
    left = memory_mib - given
    if left < 0 or (flexible and left < flexible) or (not flexible and left != 0):
        raise SpecError(
            "numa",
            f"cells with mem take {given} MiB of memory {memory_mib} MiB, leaving {left} MiB "
            f"for {flexible} other cell(s)",
            "cell sizes adding up to memory (or less, with cells without mem sharing the rest)",
        )

"""Map benchmark: ``salt-cloud -P -m`` with three VMs, salt-kvm against Salt 3007.8's
libvirt driver on the same map and base, side by side in each round (issue #17 item 2).

Per round and driver: one single VM (``salt-cloud -p``), then the map of three in
parallel. A time is ``salt-cloud`` started -> the last of its minions answered
``test.ping`` True. Printed: medians, the ratio Salt 3007.8 / salt-kvm on the map
(goal >= 2x) and each driver's map / slowest single VM of the same rounds (goal
<= 1.3x on a machine with a core per guest: with fewer cores than guests the three
TCG guests share the cores and the ratio is bounded by that, not by the driver).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from tests.integration import saltenv

DRIVERS = ("ssh", "salt3007")  # salt-kvm's drop-in SSH path; Salt 3007.8's driver
COUNT = 3


def all_true(pinger, names: list[str], started: float, timeout: float = 600) -> dict[str, float]:
    """Seconds from ``started`` to each minion's first True ``test.ping``: one
    publish to all every 3 s, answers collected from the event bus."""
    deadline = time.monotonic() + timeout
    answered: dict[str, float] = {}
    next_pub = 0.0
    while len(answered) < len(names):
        now = time.monotonic()
        if now >= deadline:
            missing = sorted(set(names) - set(answered))
            raise RuntimeError(f"never answered test.ping: {', '.join(missing)}")
        if now >= next_pub:
            waiting = [n for n in names if n not in answered]
            pinger.client.run_job(waiting, "test.ping", tgt_type="list", timeout=30, listen=False)
            next_pub = now + 3
        event = pinger.events.get_event(wait=0.05, tag="salt/job/", full=True)
        if not event:
            continue
        data = event["data"]
        if data.get("fun") == "test.ping" and data.get("return") is True:
            minion = data.get("id")
            if minion in names and minion not in answered:
                answered[minion] = time.monotonic() - started
    return answered


def run_map(env, bin_dir: Path, pinger, profile: str, names: list[str]) -> dict:
    mapfile = env.conf / "cloud.maps.d" / f"bench-{profile}.map"
    mapfile.write_text(yaml.safe_dump({profile: names}))
    cloud = saltenv.SaltEnv(env.root, env.conf, env.process, bin_dir, env.ret_port)
    started = time.monotonic()
    proc = cloud.run("salt-cloud", "-y", "-P", "-m", str(mapfile), check=False, timeout=1200)
    returned = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"salt-cloud -P -m ({profile}) failed:\n{proc.stdout}\n{proc.stderr}")
    pings = all_true(pinger, names, started)
    return {"cloud": returned, "total": max(pings.values())}


def run(conn, env, bin3007: Path, pinger, rounds: int, single, destroy, prefix: str) -> dict:
    """``single(env, bin_dir, pinger, name, profile)`` -> figures of one VM;
    ``destroy(conn, env, name, bin_dir)`` removes a guest of either driver."""
    results: dict[str, dict[str, list[float]]] = {d: {"single": [], "map": []} for d in DRIVERS}
    for rnd in range(rounds):
        for driver in DRIVERS:
            bin_dir = bin3007 if driver == "salt3007" else saltenv.BIN
            tag = driver.replace("-", "")
            one = f"{prefix}1{tag}-{rnd}"
            try:
                figures = single(env, bin_dir, pinger, one, driver)
            finally:
                destroy(conn, env, one, bin_dir)
            results[driver]["single"].append(figures["total"])
            names = [f"{prefix}m{tag}{i}-{rnd}" for i in range(COUNT)]
            try:
                mapped = run_map(env, bin_dir, pinger, driver, names)
            finally:
                for name in names:
                    destroy(conn, env, name, bin_dir)
            results[driver]["map"].append(mapped["total"])
            print(
                f"  round {rnd + 1} {driver:<9} single {figures['total']:.1f}s  "
                f"map of {COUNT} {mapped['total']:.1f}s (salt-cloud returned at "
                f"{mapped['cloud']:.1f}s)",
                flush=True,
            )
    return results


def report(results: dict, median) -> None:
    n = len(results[DRIVERS[0]]["map"])
    print(f"\nMaps, medians of {n} rounds (salt-cloud -P -m, {COUNT} VMs -> all ping True):")
    for driver in DRIVERS:
        single = median(results[driver]["single"])
        mapped = median(results[driver]["map"])
        label = "Salt 3007.8 libvirt driver" if driver == "salt3007" else "salt-kvm (SSH deploy)"
        print(f"  {label:<27} single {single:6.1f} s   map {mapped:6.1f} s")
    ours, theirs = (median(results[d]["map"]) for d in DRIVERS)
    print("Ratios:")
    print(f"  Salt 3007.8 map / salt-kvm map         {theirs / ours:5.2f}x  (goal >= 2x)")
    for driver in DRIVERS:
        worst_single = max(results[driver]["single"])
        ratio = median(results[driver]["map"]) / worst_single
        print(
            f"  {driver:<9} map / slowest single VM       {ratio:5.2f}x  "
            f"(goal <= 1.3x with a core per guest; this machine has {os.cpu_count()} for {COUNT})"
        )

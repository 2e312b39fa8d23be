"""Profiles with ``image:``: a qcow2 (and a gzipped copy) served by a loopback
HTTP server, fetched once into the pool through libvirt's upload stream, then
booted as linked and full clones through real salt-cloud."""

import contextlib
import hashlib
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import libvirt
import pytest

from salt_kvm.images import cache as images
from salt_kvm.virt import pools
from tests.imageserver import ImageServer

from .cloudcheck import assert_gone, cloud_error, created
from .conftest import BASE, GUEST_PASSWORD, GUEST_USER, IMAGES, NETWORK, POOL, PREFIX, unique


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while data := handle.read(1 << 20):
            digest.update(data)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, hv, base_domain):
    """A self-contained qcow2 of the test base's disk, and a gzipped copy."""
    root = tmp_path_factory.mktemp("images")
    (disk,) = [d for d in hv.lookupByName(BASE).XMLDesc(0).split("'") if d.endswith(".qcow2")]
    plain, packed = root / "debian.qcow2", root / "debian.qcow2.gz"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", disk, str(plain)], check=True)
    with open(packed, "wb") as out:
        subprocess.run(["gzip", "-1", "-c", str(plain)], stdout=out, check=True)
    return {"plain": plain, "packed": packed, "sha256": sha256(plain)}


@pytest.fixture(scope="module")
def server(image_files):
    srv = ImageServer(
        {"/debian.qcow2": image_files["plain"], "/debian.qcow2.gz": image_files["packed"]}
    )
    yield srv
    srv.close()


def cache_volumes(hv):
    pool = hv.storagePoolLookupByName(POOL)
    pools.refresh(pool)
    return {v for v in pool.listVolumes() if images.parse_name(v)}


@pytest.fixture(scope="module")
def clean_cache(hv, image_files):
    """No cached copy of the test image before or after the module."""
    key = f"image-sha256-{image_files['sha256'][:32]}"

    def clear():
        for name in cache_volumes(hv):
            if name.startswith(key):
                images.delete_image(hv, name, POOL)

    clear()
    yield key
    clear()


def image_profile(env, url, checksum, **extra):
    profile = {
        "provider": "test-kvm",
        "image": url,
        "image_checksum": f"sha256:{checksum}",
        "virt_type": "qemu",  # TCG: KVM guests fail on this machine
        "clone_strategy": "quick",
        "memory": 1024,
        "nics": [NETWORK],
        "ssh_username": GUEST_USER,
        "password": GUEST_PASSWORD,
        "script": "salt-preinstalled",
        "minion": env.minion_settings(),
    }
    profile.update(extra)
    return profile


def test_wrong_checksum_fails_and_leaves_nothing_in_the_pool(
    hv, salt, server, image_files, clean_cache, pool_volumes
):
    name = unique("badsum")
    before, cached_before = pool_volumes(), cache_volumes(hv)
    wrong = "0" * 64
    salt.write_profiles(
        {"badsum": image_profile(salt, server.url("/debian.qcow2"), wrong)}, "badsum.conf"
    )
    proc = salt.cloud("-p", "badsum", name, check=False)
    text = cloud_error(proc, name)
    assert "image_checksum" in text and image_files["sha256"] in text, text
    assert server.gets("/debian.qcow2") == 1
    assert cache_volumes(hv) == cached_before  # no image, no partial download
    assert_gone(hv, salt, name, before, pool_volumes)


def test_gzipped_image_boots_a_minion_and_is_downloaded_once(
    hv, salt, server, image_files, clean_cache, pool_volumes
):
    """The checksum of the decompressed qcow2 identifies the image: the gzipped
    URL is fetched once; the plain URL and a second (full) clone reuse it."""
    first, second = unique("img1"), unique("img2")
    before = pool_volumes()
    plain_gets = server.gets("/debian.qcow2")  # 1 after the wrong-checksum test, else 0
    gz_url = server.url("/debian.qcow2.gz")
    salt.write_profiles(
        {
            "img": image_profile(salt, gz_url, image_files["sha256"]),
            "img-full": image_profile(
                salt, gz_url, image_files["sha256"], clone_strategy="full", deploy=False
            ),
        },
        "img.conf",
    )
    watcher = salt.watch_events(f"salt/cloud/{first}/*")
    info = created(salt.cloud("-p", "img", first), first)
    events = salt.collected_events(watcher)
    try:
        steps = [tag.rsplit("/", 1)[1] for tag, _ in events]
        assert steps[0] == "creating" and "downloading" in steps, steps
        progress = [data.get("data", data) for tag, data in events if tag.endswith("downloading")]
        assert progress[-1]["received"] == image_files["packed"].stat().st_size
        assert info["image"] == gz_url and info["base_domain"] is None
        assert salt.salt(first, "test.ping") == {first: True}
        assert server.gets("/debian.qcow2.gz") == 1

        (cached,) = [v for v in cache_volumes(hv) if v.startswith(clean_cache)]
        vol = hv.storageVolLookupByPath(f"{IMAGES}/{first}.qcow2")
        assert cached in vol.XMLDesc(0)  # the linked clone's backing volume

        info2 = created(salt.cloud("-p", "img-full", second), second)
        assert info2["private_ips"]
        assert server.gets("/debian.qcow2.gz") == 1  # not downloaded again
        spec = images.ImageSpec(
            server.url("/debian.qcow2"),
            images.fetch.parse_checksum(f"sha256:{image_files['sha256']}"),
            pool=POOL,
        )
        assert images.ensure(hv, spec).name == cached
        assert server.gets("/debian.qcow2") == plain_gets  # not downloaded

        listed = json.loads(salt.cloud("-f", "image_list", "test-kvm").stdout)
        assert first in json.dumps(listed) and cached in json.dumps(listed)
        refused = salt.cloud("-f", "image_delete", "test-kvm", f"name={cached}", check=False)
        assert f"used by {first}" in cloud_error(refused, first)
    finally:
        salt.cloud("-d", first, second)
    assert_gone(hv, salt, first, before, pool_volumes)
    assert_gone(hv, salt, second, before, pool_volumes)
    deleted = json.loads(salt.cloud("-f", "image_delete", "test-kvm", f"name={cached}").stdout)
    assert cached in json.dumps(deleted)
    with pytest.raises(libvirt.libvirtError):
        hv.storagePoolLookupByName(POOL).storageVolLookupByName(cached)


# ---- secrets ---------------------------------------------------------------------
IMG_USER, IMG_PASS, IMG_TOKEN = "imgu-7Qx", "ImgPw-k2Vd9", "tok-R8mZ3wq1"
SCRIPT_SECRET, LIBVIRT_PASS = "ScriptArg-h4Ty8", "LvPw-p0Qz7"
SECRETS = (IMG_PASS, IMG_TOKEN, f"{IMG_USER}:", SCRIPT_SECRET, LIBVIRT_PASS)
GUEST_PASSWORD_SHOWN = re.compile(rf"pass(word)?\W{{0,8}}{re.escape(GUEST_PASSWORD)}", re.I)


def _leaks(text: str) -> list[str]:
    found = [s for s in SECRETS if s in text]
    return found + GUEST_PASSWORD_SHOWN.findall(text)


class CmdlineSampler(threading.Thread):
    """Reads every process's command line while salt-cloud runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.seen, self.samples = threading.Event(), set(), 0

    def run(self):
        while not self.stop.is_set():
            for entry in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):
                    self.seen.add(entry.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            self.samples += 1
            time.sleep(0.1)


def _world_readable_texts(*roots, prefixes=("",), limit=64 * 1024**2):
    """(path, content) of the world-readable files under ``roots`` whose names
    start with one of ``prefixes``, small enough to read."""
    for root in roots:
        for path in Path(root).rglob("*"):
            if not path.name.startswith(prefixes):
                continue
            with contextlib.suppress(OSError):
                st = path.stat()
                if path.is_file() and st.st_mode & 0o004 and st.st_size < limit:
                    yield str(path), path.read_bytes().decode(errors="replace")


def test_secrets_of_a_profile_go_nowhere(hv, salt, image_files, pool_volumes, tmp_path):
    """A real ``salt-cloud -p`` at ``-l all``: an image URL with user:password@
    and ?token=, script_args and a libvirt password with secrets, the SSH
    password. None is in a log, an event on the master's bus, the domain's XML
    or metadata, a world-readable file under the pool or Salt's directories,
    or any process's command line seen during the run."""
    name = unique("secret")
    before = pool_volumes()
    key = f"image-sha256-{image_files['sha256'][:32]}"
    srv = ImageServer(
        {"/debian.qcow2": image_files["plain"]},
        require_auth=(IMG_USER, IMG_PASS),
        require_token=IMG_TOKEN,
    )
    plain = srv.url("/debian.qcow2")
    url = plain.replace("http://", f"http://{IMG_USER}:{IMG_PASS}@") + f"?token={IMG_TOKEN}"
    provider = {
        "secret-kvm": {
            "driver": "libvirt",
            "url": "qemu:///system",
            "libvirt_username": "root",
            "libvirt_password": LIBVIRT_PASS,
        }
    }
    salt.write_providers(provider, "secret.conf")
    profile = image_profile(
        salt, url, image_files["sha256"], provider="secret-kvm", script_args=f"-X {SCRIPT_SECRET}"
    )
    salt.write_profiles({"secret": profile}, "secret.conf")
    for volume in cache_volumes(hv):
        if volume.startswith(key):
            images.delete_image(hv, volume, POOL)
    log_file = tmp_path / "cloud-all.log"
    watcher = salt.watch_events("*")
    sampler = CmdlineSampler()
    sampler.start()
    try:
        proc = salt.run(
            "salt-cloud", "-y", "--out=json", "-l", "all", "--log-file", str(log_file),
            "--log-file-level", "all", "-p", "secret", name,
        )  # fmt: skip
        info = created(proc, name)
        sampler.stop.set()
        sampler.join()
        events = salt.collected_events(watcher)
        assert srv.gets("/debian.qcow2") == 1  # the credentials opened the download
        assert info["image"] == plain
        assert salt.salt(name, "test.ping") == {name: True}
        dom = hv.lookupByName(name)
        shown = {
            "stdout+stderr": proc.stdout + proc.stderr,
            "log -l all": log_file.read_text(errors="replace"),
            "events": json.dumps(events),
            "domain xml": dom.XMLDesc(0) + dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
            "cmdlines": "\n".join(sampler.seen),
            "volume names": " ".join(hv.storagePoolLookupByName(POOL).listVolumes()),
        }
        for where in ("cloud.log", "master.log"):
            if (salt.root / where).exists():
                shown[where] = (salt.root / where).read_text(errors="replace")
        # the pool: only this test's files (other sessions' are not ours to read)
        pool_dir = IMAGES
        for path, text in _world_readable_texts(pool_dir, prefixes=(PREFIX, "image-")):
            shown[path] = text
        for path, text in _world_readable_texts(salt.root):
            shown[path] = text
        assert len(shown["log -l all"]) > 10_000 and sampler.samples > 10 and events
        leaks = {where: _leaks(text) for where, text in shown.items() if _leaks(text)}
        assert leaks == {}
    finally:
        sampler.stop.set()
        srv.close()
        salt.cloud("-d", name, check=False)
        # A second provider on the same hypervisor lists every guest twice: the
        # module's later tests must not see it (their -d would destroy twice).
        for sub in ("cloud.providers.d", "cloud.profiles.d"):
            (salt.conf / sub / "secret.conf").unlink(missing_ok=True)
        for volume in cache_volumes(hv):
            if volume.startswith(key):
                with contextlib.suppress(Exception):
                    images.delete_image(hv, volume, POOL)
    assert_gone(hv, salt, name, before, pool_volumes)


def test_auto_virt_type_on_an_image_boots_with_what_works_here(
    hv, salt, server, image_files, clean_cache, pool_volumes, tmp_path, monkeypatch
):
    """No base domain to copy a type from, libvirt offers KVM: the default
    ``auto`` probes once and keeps the answer. Where KVM guests stop at once
    (nested virtualization broken, most of these machines) it picks qemu and
    says so; where the probe guest kept running, kvm."""
    monkeypatch.setenv("SALT_KVM_CACHE", str(tmp_path))  # salt-cloud's probe cache
    name = unique("imgauto")
    before = pool_volumes()
    profile = image_profile(salt, server.url("/debian.qcow2"), image_files["sha256"], deploy=False)
    del profile["virt_type"]
    salt.write_profiles({"imgauto": profile}, "imgauto.conf")
    info = created(salt.cloud("-p", "imgauto", name), name)
    try:
        (probe,) = (tmp_path / "kvm-probe").glob("probe-*.json")  # one probe, kept
        works = json.loads(probe.read_text())["kvm_works"]
        kind = "kvm" if works else "qemu"
        assert hv.lookupByName(name).XMLDesc(0).startswith(f"<domain type='{kind}'")
        if not works:
            assert "virt_type auto: using qemu" in info["virt_type_note"]
            assert "stopped running" in info["virt_type_note"]
        assert info["ip_address"]
    finally:
        salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, pool_volumes)

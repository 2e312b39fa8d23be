"""salt_source on an image without Salt, through real salt-cloud: the test
image's ``nosalt`` variant (no Salt, no QEMU guest agent: as a stock cloud
image comes) becomes a pinging minion from a pip wheelhouse the test serves on
the test network's host address; a wrong mirror URL ends the create quickly,
naming the guest-side cause (read from the serial console: the guest has no
agent), with nothing left behind; ``bootstrap`` runs the script from
``bootstrap_script_url`` (a stand-in for Salt's, on the Salt image). One guest
at a time."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import libvirt
import pytest

from salt_kvm.virt import lifecycle, pools
from salt_kvm.virt.domain import Domain, new_domain
from salt_kvm.virt.rollback import Rollback

from .cloudcheck import assert_gone, cloud_error, created
from .conftest import NETWORK, POOL, prefixed_volumes, unique
from .saltenv import MASTER_ADDRESS, port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MIRROR_PORT = port("mirror")
SALT_VERSION = os.environ.get("SALT_VERSION", "3008.3")
# A pip install of Salt under TCG takes minutes; the failure case must end
# far sooner than this.
MINION_TIMEOUT = 1200


def _script(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """Salt's wheels as the test image build caches them (downloaded if
    missing), and a pip wheel: the guest has no python3-venv (ensurepip)."""
    cached = Path(_script("bash", "-c", ". scripts/lib.sh && salt_wheels"))
    served = tmp_path_factory.mktemp("wheelhouse")
    for wheel in cached.glob("*.whl"):
        (served / wheel.name).symlink_to(wheel)
    pips = sorted(Path("/usr/share/python-wheels").glob("pip-*.whl"))  # Debian's python3-pip-whl
    if pips:
        shutil.copy(pips[-1], served)
    else:
        _script("python3", "-m", "pip", "download", "-q", "--no-deps", "pip", "-d", str(served))
    os.chmod(served, 0o755)
    return str(served)


@pytest.fixture(scope="module")
def mirror(wheelhouse):
    """The wheelhouse over HTTP on the test network's host address only."""
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(
        (MASTER_ADDRESS, MIRROR_PORT), functools.partial(Handler, directory=wheelhouse)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{MASTER_ADDRESS}:{MIRROR_PORT}/", requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def nosalt_base(hv, base_domain):
    """A shut-off base domain on the nosalt image (built if missing), of the
    test base's domain type; removed with its volume at the end."""
    image = _script("scripts/build-test-image", "--variant", "nosalt")
    name = unique("nosalt-base")
    pool = hv.storagePoolLookupByName(POOL)
    folder = Domain(pool.XMLDesc(0)).node.findtext("target/path")
    path = os.path.join(folder, f"{name}.qcow2")
    shutil.copyfile(image, path)
    pools.refresh(pool)  # waits while the other stream builds a volume here
    virt_type = Domain(hv.lookupByName(base_domain).XMLDesc(0)).type
    xml = new_domain(name, virt_type, 1024, 1, path, networks=(NETWORK,))
    lifecycle.define(hv, xml, Rollback())
    yield name
    lifecycle.undefine(hv.lookupByName(name))
    hv.storageVolLookupByPath(path).delete(0)


def profile(salt, base, source):
    return {
        "provider": "test-kvm",
        "base_domain": base,
        "clone_strategy": "quick",
        "ip_source": "ip-learning",
        "deploy_method": "cloud-init",
        "salt_source": source,
        "salt_version": SALT_VERSION,
        "wait_for_minion_timeout": MINION_TIMEOUT,
        "minion": salt.minion_settings(),
    }


def test_a_wheelhouse_makes_a_stock_image_a_minion(hv, salt, nosalt_base, mirror):
    url, requests = mirror
    salt.write_profiles({"src": profile(salt, nosalt_base, url)}, "src.conf")
    name = unique("src")
    before = prefixed_volumes(hv)
    started = time.monotonic()
    info = created(salt.cloud("-p", "src", name, timeout=MINION_TIMEOUT + 300), name)
    took = time.monotonic() - started
    try:
        print(
            f"\nsalt_source wheelhouse: minion up {took:.0f} s after salt-cloud -p; "
            f"timings {json.dumps(info.get('timings'))}"
        )
        assert info["deploy"]["method"] == "cloud-init"
        assert any(p.endswith(".whl") for p in requests), requests  # it came from the mirror
        assert salt.salt(name, "test.ping")[name] is True
        where = salt.salt(name, "cmd.run", "readlink -f /usr/bin/salt-minion")[name]
        assert where == "/opt/saltstack/salt/bin/salt-minion"
        assert salt.salt(name, "grains.get", "saltversion")[name] == SALT_VERSION
        # A stock image's lacks: no venv module's pip, no guest agent.
        for package in ("python3-venv", "qemu-guest-agent"):
            assert salt.salt(name, "cmd.retcode", f"dpkg -s {package}")[name] != 0, package
    finally:
        salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, lambda: prefixed_volumes(hv))


# Salt's bootstrap script cannot run here (it downloads Salt from the
# internet): this one stands in for it on an image that has Salt already, and
# shows what salt-kvm does around it: fetched from bootstrap_script_url, run
# as root with the pinned version, then the image's minion unit started.
FAKE_BOOTSTRAP = """#!/bin/sh
echo "$*" > /var/tmp/salt-kvm-bootstrap-args
id -u >> /var/tmp/salt-kvm-bootstrap-args
"""


def test_bootstrap_fetches_the_script_and_runs_it_with_the_version(
    hv, salt, base_domain, mirror, wheelhouse
):
    url, requests = mirror
    (Path(wheelhouse) / "bootstrap-salt.sh").write_text(FAKE_BOOTSTRAP)
    values = profile(salt, base_domain, "bootstrap")
    values["bootstrap_script_url"] = url + "bootstrap-salt.sh"
    salt.write_profiles({"src-bootstrap": values}, "src-bootstrap.conf")
    name = unique("srcbs")
    before = prefixed_volumes(hv)
    created(salt.cloud("-p", "src-bootstrap", name, timeout=MINION_TIMEOUT + 300), name)
    try:
        assert "/bootstrap-salt.sh" in requests
        assert salt.salt(name, "test.ping")[name] is True
        ran = salt.salt(name, "cmd.run", "cat /var/tmp/salt-kvm-bootstrap-args")[name]
        assert ran.splitlines() == [f"-X stable {SALT_VERSION}", "0"]
    finally:
        salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, lambda: prefixed_volumes(hv))


def test_a_wrong_mirror_url_fails_fast_naming_the_cause(hv, salt, nosalt_base, mirror):
    url, _ = mirror
    wrong = url + "no-such-wheelhouse/"
    salt.write_profiles({"src-wrong": profile(salt, nosalt_base, wrong)}, "src-wrong.conf")
    name = unique("srcbad")
    before = prefixed_volumes(hv)
    started = time.monotonic()
    proc = salt.cloud("-p", "src-wrong", name, check=False, timeout=MINION_TIMEOUT + 300)
    took = time.monotonic() - started
    print(f"\nsalt_source wrong URL: the create failed after {took:.0f} s")
    text = cloud_error(proc, name)
    assert f"the minion cannot start in the guest {name}" in text
    assert f"cannot download {wrong}: HTTP 404" in text
    assert took < 300, f"took {took:.0f} s: not fast (minion timeout {MINION_TIMEOUT} s)"
    with pytest.raises(libvirt.libvirtError):
        hv.lookupByName(name)
    assert_gone(hv, salt, name, before, lambda: prefixed_volumes(hv))

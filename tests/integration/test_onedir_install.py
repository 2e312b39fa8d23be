"""salt-kvm installed as users of Salt's onedir packages install it: a wheel
built from this checkout, put into an onedir-shaped Salt (its own Python,
scripts/build-onedir-salt) with that Salt's ``salt-pip``, libvirt-python
built there; then the driver and modules load with the onedir's own
``salt-call`` and ``salt-cloud``, and the NAT hooks would hand over to the
onedir's Python.

The onedir is built once and cached (about 15 s with Salt's wheels cached);
each run works on a hard-linked copy with an empty extras folder, so
``salt-pip`` starts from what the package gives.
"""

import email
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

import salt_kvm

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The onedir's Python (Debian's CPython copied) may differ from the tests' own.
PYV = subprocess.run(
    ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
    capture_output=True,
    text=True,
).stdout.strip()
URI = "qemu:///system"
LOADER_MODULES = {"kvm_backup", "kvm_disk", "kvm_host", "kvm_nat"}
# What the package must declare: its loader entry point and the libraries it imports.
REQUIRED = {"libvirt-python", "lxml", "jinja2", "paramiko", "pycdlib", "pyyaml"}


def run(cmd, timeout=300, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _clean_env() -> dict:
    """The environment a root shell has: no PYTHONPATH of the test's venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def onedir_run(cmd, timeout=300, **env):
    """A command of the onedir, run away from the checkout (``python -c`` puts
    the working directory first on sys.path)."""
    return run(cmd, timeout=timeout, env={**_clean_env(), **env}, cwd="/")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The wheel and sdist built from a copy of the checkout, as a release would be."""
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "salt-kvm"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", "_build"
        ),
    )
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(src)])  # fmt: skip
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    run([sys.executable, "-c", code, str(out)], cwd=src)
    (wheel,) = out.glob("salt_kvm-*.whl")
    (sdist,) = out.glob("salt_kvm-*.tar.gz")
    return wheel, sdist


def _requirements(meta) -> dict:
    """Requirement name → its marker ('' when unconditional)."""
    found = {}
    for line in meta.get_all("Requires-Dist") or []:
        spec, _, marker = line.partition(";")
        name = spec.strip().split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip()
        found[name.lower()] = marker.strip()
    return found


def test_wheel_and_sdist_metadata(built, tmp_path):
    wheel, sdist = built
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        meta = email.message_from_bytes(whl.read(f"{info}/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    assert meta["Name"] == "salt-kvm" and meta["Version"] == salt_kvm.__version__
    requires = _requirements(meta)
    assert {n: requires.get(n) for n in REQUIRED} == dict.fromkeys(REQUIRED, ""), requires
    # Salt only as an extra: salt-pip (pip --target) would otherwise install a
    # second Salt into the onedir's extras, ahead of the onedir's own.
    assert requires.get("salt", "").startswith("extra ==")
    assert "[salt.loader]" in entry_points
    assert "salt-kvm = salt_kvm.loader:get_loader_dirs" in entry_points
    for module in LOADER_MODULES:
        assert f"salt_kvm/_modules/{module}.py" in names
        assert f"salt_kvm/_states/{module}.py" in names
    assert "salt_kvm/clouds/libvirt.py" in names
    # every module of every subpackage (setup.cfg lists the packages by hand)
    library = {str(p.relative_to(REPO)) for p in (REPO / "salt_kvm").rglob("*.py")}
    assert library - names == set()

    # The sdist carries everything the wheel is built from: a wheel built from
    # it holds the same files.
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        pkg_info = email.message_from_bytes(tar.extractfile(f"{top}/PKG-INFO").read())
        tar.extractall(tmp_path, filter="data")
    assert (pkg_info["Name"], pkg_info["Version"]) == ("salt-kvm", salt_kvm.__version__)
    again = tmp_path / "again"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(again), str(tmp_path / top)])  # fmt: skip
    with zipfile.ZipFile(next(again.glob("*.whl"))) as whl:
        assert set(whl.namelist()) == names


@pytest.fixture(scope="module")
def onedir(tmp_path_factory):
    """A hard-linked copy of the cached onedir-shaped Salt, its extras folder empty."""
    built_dir = Path(run([str(REPO / "scripts" / "build-onedir-salt")], timeout=1800).strip())
    copy = built_dir.parent / f"test-{uuid.uuid4().hex[:8]}" / "salt"
    copy.parent.mkdir(parents=True)
    run(["cp", "-al", str(built_dir), str(copy)])
    shutil.rmtree(copy / f"extras-{PYV}")
    (copy / f"extras-{PYV}").mkdir()
    yield copy
    shutil.rmtree(copy.parent)


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    """Minion and master configuration of the onedir's commands, all in a temp dir."""
    root = tmp_path_factory.mktemp("onedir-conf")
    etc = root / "etc"
    (etc / "cloud.providers.d").mkdir(parents=True)
    base = {
        "root_dir": str(root),
        "pki_dir": str(root / "pki"),
        "cachedir": str(root / "cache"),
        "sock_dir": str(root / "sock"),
        "log_file": str(root / "log"),
        "user": "root",
    }
    (etc / "minion").write_text(yaml.safe_dump({**base, "file_client": "local", "id": "hv"}))
    (etc / "master").write_text(yaml.safe_dump(base))
    (etc / "cloud").write_text(yaml.safe_dump({"log_file": str(root / "cloud.log")}))
    providers = {"onedir-kvm": {"driver": "libvirt", "url": URI}}
    (etc / "cloud.providers.d" / "kvm.conf").write_text(yaml.safe_dump(providers))
    return etc


@pytest.fixture(scope="module")
def installed(onedir, built, conf):
    """``salt-pip install WHEEL``, as an admin runs it; no wheel cache, so
    libvirt-python (an sdist only) is compiled here, against the onedir's headers."""
    wheel, _ = built
    onedir_run([str(onedir / "salt-pip"), "install", "-q", "--no-cache-dir", str(wheel)],
               timeout=1200, SALT_CONFIG_DIR=str(conf))  # fmt: skip
    return onedir


def onedir_python(onedir, code):
    return onedir_run([str(onedir / "bin" / f"python{PYV}"), "-c", code])


def salt_call(onedir, conf, *args):
    out = onedir_run(
        [str(onedir / "salt-call"), "--local", "-c", str(conf), "--out=json",
         "--log-level=quiet", *args]
    )  # fmt: skip
    return json.loads(out)["local"]


def test_onedir_python_is_its_own(onedir):
    """Not a venv over the system's Python: its own prefix, no system packages."""
    facts = json.loads(
        onedir_python(
            onedir,
            "import json, sys, sysconfig; print(json.dumps([sys.prefix, sys.base_prefix, "
            "str(sys.RELENV), sys.path, sysconfig.get_config_var('INCLUDEPY')]))",
        )
    )
    prefix, base_prefix, relenv, path, include = facts
    assert prefix == base_prefix == relenv == str(onedir)
    assert all(p == "" or p.startswith(str(onedir)) for p in path), path
    assert path[1] == str(onedir / f"extras-{PYV}")
    # C extensions build against the onedir's own headers.
    assert include == str(onedir / "include" / f"python{PYV}")
    assert (Path(include) / "Python.h").is_file()


def test_salt_pip_installs_into_extras_and_leaves_salt_alone(installed):
    where = json.loads(
        onedir_python(
            installed,
            "import json, libvirt, salt, salt.version, salt_kvm; "
            "print(json.dumps([salt_kvm.__file__, libvirt.__file__, salt.__file__, "
            "salt.version.__version__]))",
        )
    )
    kvm, libvirt_mod, salt_file, salt_version = where
    extras = installed / f"extras-{PYV}"
    assert kvm.startswith(str(extras)) and libvirt_mod.startswith(str(extras))
    assert list(extras.glob("libvirtmod.cpython-*.so")), "libvirt-python was not built here"
    # The onedir's own Salt still runs: salt-pip put no second one ahead of it.
    assert salt_file.startswith(str(installed / "lib")), salt_file
    assert not (extras / "salt").exists()
    out = onedir_run([str(installed / "salt-call"), "--version"])
    assert out.split()[1] == salt_version


def test_modules_and_states_load(installed, conf):
    modules = set(salt_call(installed, conf, "sys.list_modules"))
    states = set(salt_call(installed, conf, "sys.list_state_modules"))
    assert LOADER_MODULES <= modules, sorted(modules)
    assert LOADER_MODULES <= states, sorted(states)


def test_kvm_host_info_on_the_hypervisor(installed, conf, hv):
    facts = salt_call(installed, conf, "kvm_host.info")
    assert facts["hypervisor"] == "QEMU" and facts["salt_kvm_version"] == salt_kvm.__version__
    assert facts["libvirt_version"] == ".".join(map(str, _split(hv.getLibVersion())))


def _split(version: int) -> tuple[int, int, int]:
    return version // 1_000_000, version // 1000 % 1000, version % 1000


def test_salt_cloud_list_locations(installed, conf, hv):
    out = onedir_run(
        [str(installed / "salt-cloud"), "-c", str(conf), "--list-locations", "onedir-kvm",
         "--out=json", "--log-level=quiet"]
    )  # fmt: skip
    facts = json.loads(out)["onedir-kvm"]["libvirt"][URI]
    assert facts["driver"].startswith("salt-kvm "), facts
    assert facts["hypervisor"] == "QEMU"


def test_install_hooks_name_the_onedir_python(installed, conf, tmp_path):
    hooks = tmp_path / "hooks"
    written = salt_call(installed, conf, "kvm_nat.install_hooks", f"hooks_dir={hooks}")
    hook_conf = hooks / "salt-kvm-hook.conf"
    assert str(hook_conf) in written
    values = dict(line.split("=", 1) for line in hook_conf.read_text().splitlines() if "=" in line)
    assert values["python"] == str(installed / "bin" / f"python{PYV}")
    assert values["path"] == str(installed / f"extras-{PYV}")
    # The hooks are /bin/sh scripts that hand over to that Python; run as they
    # run it (-E -s, hook.conf's path first), it finds salt-kvm and libvirt.
    for driver in ("network", "qemu"):
        (hook,) = (hooks / f"{driver}.d").iterdir()
        assert hook.read_text().startswith("#!/bin/sh")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import libvirt; "
        "from salt_kvm.nat import hooks; print(hooks.__file__)"
    )
    out = onedir_run([values["python"], "-E", "-s", "-c", code, values["path"]])
    assert out.strip().startswith(values["path"] + "/salt_kvm/")

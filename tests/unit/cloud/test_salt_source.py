"""salt_source: the profile's forms and refusals, the cloud-config that carries
the install, the guest-side installer (run here against a loopback HTTP
server) and the serial console channel of a failure."""

import functools
import hashlib
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading

import pytest

from salt_kvm.cloud import deploy as cloud_deploy
from salt_kvm.cloud import saltsource
from salt_kvm.cloud.spec import build_spec
from salt_kvm.cloud.sshdeploy import Bundle
from salt_kvm.errors import SpecError

SHA = "ab" * 32


def source(**values):
    values.setdefault("salt_source", "bootstrap")
    return saltsource.parse(values, "cloud-init", True, False)


def profile(**extra):
    return {
        "name": "vm1",
        "base_domain": "base",
        "deploy_method": "cloud-init",
        "minion": {"master": "192.0.2.1"},
        **extra,
    }


# ---- the forms ------------------------------------------------------------------


def test_absent_is_todays_behaviour():
    assert saltsource.parse({}, "cloud-init", True, False) is None
    assert build_spec(profile()).deploy.salt_source is None


def test_bootstrap_pins_the_version_and_takes_salt_clouds_url_key():
    assert source(salt_version="3007.8") == saltsource.SaltSource(
        "bootstrap", saltsource.DEFAULT_BOOTSTRAP_URL, "3007.8"
    )
    own = source(bootstrap_script_url="https://mirror.example/bootstrap-salt.sh")
    assert own.url == "https://mirror.example/bootstrap-salt.sh" and own.version is None


def test_unquoted_yaml_versions_read_as_written():
    assert source(salt_version=3007.8).version == "3007.8"
    assert source(salt_version=3008).version == "3008"


def test_a_tarball_url_is_a_onedir_with_an_optional_sha256():
    url = "http://192.0.2.1:8000/salt-3007.8-onedir-linux-x86_64.tar.xz"
    assert source(salt_source=url) == saltsource.SaltSource("onedir", url)
    checked = source(salt_source=f"{url}#sha256={SHA.upper()}")
    assert (checked.kind, checked.url, checked.sha256) == ("onedir", url, SHA)
    assert source(salt_source="https://m.example/salt.tgz").kind == "onedir"
    assert source(salt_source="https://m.example/salt.tar.gz").kind == "onedir"


def test_any_other_http_url_is_a_wheelhouse():
    got = source(salt_source="http://192.0.2.1:8000/wheels/", salt_version="3008.3")
    assert got == saltsource.SaltSource("wheelhouse", "http://192.0.2.1:8000/wheels/", "3008.3")


def test_agent_is_installed_when_ip_source_needs_it():
    spec = build_spec(profile(salt_source="bootstrap", ip_source="qemu-agent"))
    assert spec.deploy.salt_source.agent is True
    assert build_spec(profile(salt_source="bootstrap")).deploy.salt_source.agent is False


# ---- the refusals, by name, before anything is made ------------------------------


@pytest.mark.parametrize(
    ("values", "key", "problem"),
    [
        ({"salt_source": ["bootstrap"]}, "salt_source", "a list is not a Salt source"),
        ({"salt_source": "pip"}, "salt_source", "is not an http(s):// URL"),
        ({"salt_source": "ftp://m.example/w/"}, "salt_source", "is not an http(s):// URL"),
        ({"salt_source": "http:///w/"}, "salt_source", "is not an http(s):// URL"),
        ({"salt_source": "http://m.example/a b/"}, "salt_source", "spaces, quotes"),
        ({"salt_source": "http://m.example/w/#x"}, "salt_source", "takes no #fragment"),
        ({"salt_source": "http://m.example/s.tar.xz#md5=1"}, "salt_source", "not a checksum"),
        (
            {"salt_source": "http://m.example/s.tar.xz", "salt_version": "3007.8"},
            "salt_version",
            "does not apply to a onedir tarball",
        ),
        ({"salt_version": "3007.8"}, "salt_version", "only applies with salt_source"),
        ({"salt_version": "latest"}, "salt_version", "is not a Salt version"),
        ({"salt_version": True}, "salt_version", "is not a Salt version"),
        (
            {"bootstrap_script_url": "file:///tmp/b.sh"},
            "bootstrap_script_url",
            "is not an http(s):// URL",
        ),
    ],
)
def test_bad_values_are_refused_by_name(values, key, problem):
    values = {"salt_source": "bootstrap", **values} if "salt_source" not in values else values
    if list(values) == ["salt_source", "salt_version"] and values["salt_source"] == "bootstrap":
        values = {"salt_version": values["salt_version"]}
    with pytest.raises(SpecError) as err:
        saltsource.parse(values, "cloud-init", True, False)
    assert err.value.key == key
    assert problem in err.value.problem


def test_salt_version_alone_is_refused():
    with pytest.raises(SpecError) as err:
        build_spec(profile(salt_version="3007.8"))
    assert err.value.key == "salt_version"


def test_credentials_in_the_url_are_refused_and_not_shown():
    with pytest.raises(SpecError) as err:
        build_spec(profile(salt_source="https://user:s3cret@m.example/wheels/"))
    assert err.value.key == "salt_source"
    assert "s3cret" not in str(err.value) and "user" not in err.value.problem


def test_an_ssh_deploy_is_refused_with_the_way_out():
    values = profile(salt_source="bootstrap", deploy_method="ssh", password="x")
    with pytest.raises(SpecError) as err:
        build_spec(values)
    assert err.value.key == "salt_source"
    assert "deploy_method: ssh" in err.value.problem
    assert "deploy_method: cloud-init" in str(err.value.accepted)
    assert "script: bootstrap-salt" in str(err.value.accepted)


@pytest.mark.parametrize("extra", [{"deploy": False}, {"deploy_method": "none"}])
def test_no_deploy_is_refused(extra):
    with pytest.raises(SpecError) as err:
        build_spec(profile(salt_source="bootstrap", **extra))
    assert err.value.key == "salt_source"


# ---- the seed: the install rides in write_files, before the start ----------------


def plan(src):
    files = {"minion": (b"master: 192.0.2.1\n", 0o600)}
    return cloud_deploy.Plan(Bundle(files=files), "vm1", "PUBLIC", 60, src)


def test_the_cloud_config_carries_the_install_before_the_start():
    src = saltsource.SaltSource("onedir", "http://192.0.2.1/s.tar.xz", None, SHA)
    config = cloud_deploy.cloud_config(plan(src))
    paths = [f["path"] for f in config["write_files"]]
    assert paths.index(saltsource.SOURCE_FILE) < paths.index(cloud_deploy.START_SCRIPT)
    assert paths.index(saltsource.INSTALLER) < paths.index(cloud_deploy.SEEDED)
    files = {f["path"]: f for f in config["write_files"]}
    assert json.loads(files[saltsource.SOURCE_FILE]["content"]) == {
        "kind": "onedir",
        "url": "http://192.0.2.1/s.tar.xz",
        "agent": False,
        "sha256": SHA,
    }
    assert files[saltsource.SOURCE_FILE]["permissions"] == "0600"
    assert files[saltsource.INSTALLER]["permissions"] == "0700"
    assert (
        f"python3 {saltsource.INSTALLER} {saltsource.SOURCE_FILE}"
        in (files[cloud_deploy.START_SCRIPT]["content"])
    )


def test_without_salt_source_the_seed_is_as_before():
    paths = [f["path"] for f in cloud_deploy.cloud_config(plan(None))["write_files"]]
    assert saltsource.SOURCE_FILE not in paths and saltsource.INSTALLER not in paths


# ---- the installer, run here (loopback only) -------------------------------------


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www
    server.shutdown()
    server.server_close()


def onedir_tarball(path, member="salt/salt-minion"):
    with tarfile.open(path, "w:gz") as tar:
        data = b"#!/bin/sh\necho minion\n"
        info = tarfile.TarInfo(member)
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))


def run_installer(tmp_path, settings):
    """The installer with /opt/saltstack and /usr/bin moved under tmp_path and
    no retries; returns (exit code, last stderr line, root)."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    text = saltsource.INSTALLER_TEXT.replace("/opt/saltstack", f"{root}/opt/saltstack")
    text = text.replace('"/usr/bin/"', f'"{root}/usr/bin/"').replace(
        "TRIES_FOR = 40", "TRIES_FOR = 0"
    )
    script, conf = tmp_path / "install-salt", tmp_path / "salt-source.json"
    script.write_text(text)
    conf.write_text(json.dumps(settings))
    done = subprocess.run(
        [sys.executable, str(script), str(conf)], capture_output=True, text=True, timeout=60
    )
    lines = done.stderr.strip().splitlines()
    return done.returncode, (lines[-1] if lines else ""), root


def test_installer_extracts_a_checked_onedir_tarball(tmp_path, mirror):
    base, www = mirror
    onedir_tarball(www / "salt.tar.gz")
    sha = hashlib.sha256((www / "salt.tar.gz").read_bytes()).hexdigest()
    code, err, root = run_installer(
        tmp_path, {"kind": "onedir", "url": f"{base}/salt.tar.gz", "sha256": sha}
    )
    assert (code, err) == (0, "")
    link = root / "usr/bin/salt-minion"
    assert link.resolve() == root / "opt/saltstack/salt/salt-minion"
    assert subprocess.run([str(link)], capture_output=True, text=True).stdout == "minion\n"


def test_installer_names_a_wrong_checksum(tmp_path, mirror):
    base, www = mirror
    onedir_tarball(www / "salt.tar.gz")
    code, err, root = run_installer(
        tmp_path, {"kind": "onedir", "url": f"{base}/salt.tar.gz", "sha256": SHA}
    )
    assert code == 1 and f"the profile says {SHA}" in err
    assert not (root / "opt/saltstack/salt").exists()


def test_installer_refuses_a_tarball_that_is_not_a_onedir(tmp_path, mirror):
    base, www = mirror
    onedir_tarball(www / "other.tar.gz", member="etc/passwd")
    code, err, root = run_installer(tmp_path, {"kind": "onedir", "url": f"{base}/other.tar.gz"})
    assert code == 1 and "is outside salt/: not a Salt onedir tarball" in err
    assert not (root / "opt/saltstack/salt").exists()


def test_installer_names_a_missing_file_and_an_unreachable_mirror(tmp_path, mirror):
    base, _ = mirror
    code, err, _ = run_installer(tmp_path, {"kind": "onedir", "url": f"{base}/none.tar.xz"})
    assert code == 1 and err == f"cannot download {base}/none.tar.xz: HTTP 404 File not found"
    closed = "http://127.0.0.1:9/wheels/"  # discard port: nothing listens
    code, err, _ = run_installer(tmp_path, {"kind": "wheelhouse", "url": closed})
    assert code == 1 and err.startswith(f"cannot reach {closed}: ") and "refused" in err


def test_a_failed_install_is_the_start_scripts_cause(tmp_path):
    """The start script runs the installer first and reports its last line."""
    root = tmp_path / "root"
    (root / "run/salt-kvm").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("systemctl", "systemd-run", "sleep"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    (bin_dir / "python3").write_text(
        "#!/bin/sh\necho 'pip says'; echo 'cannot reach X: down' >&2\nexit 1\n"
    )
    (bin_dir / "python3").chmod(0o755)
    (root / "run/salt-kvm/salt-source.json").write_text("{}")
    script = cloud_deploy.START_SCRIPT_TEXT.replace("/run/", f"{root}/run/")
    script = script.replace("/dev/console", "/dev/null")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["/bin/sh", "-c", script], env=env, check=False, timeout=60)
    status = (root / "run/salt-kvm/minion-status").read_text()
    assert status == "failed: installing Salt failed: cannot reach X: down\n"


# ---- the host side: the serial console when the guest has no agent ---------------


class Stream:
    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.aborted = False

    def recv(self, n):
        return self.chunks.pop(0) if self.chunks else -2

    def abort(self):
        self.aborted = True


class Dom:
    def __init__(self, stream):
        self.stream = stream

    def connect(self):
        return self

    def newStream(self, flags):
        return self.stream

    def openConsole(self, dev, stream, flags):
        pass

    def name(self):
        return "vm1"


def test_a_failure_on_the_serial_console_ends_the_wait(monkeypatch):
    from salt_kvm.cloud.provision import Guest
    from salt_kvm.errors import SaltKvmError

    monkeypatch.setattr(cloud_deploy.guestagent, "read_file", lambda dom, path: None)
    line = f"\r\n{cloud_deploy.CONSOLE_MARK}installing Salt failed: cannot\x1b[31m reach X\r\n"
    # -2: nothing more for now (a non-blocking stream's EAGAIN)
    stream = Stream([b"[  OK  ] Started ssh.\r\n", line[:30].encode(), -2, line[30:].encode()])
    guest = Guest("vm1", Dom(stream), [])
    check = cloud_deploy.StartCheck()
    check(guest)  # the first poll sees boot noise and half a line: no verdict yet
    with pytest.raises(SaltKvmError) as err:
        check(guest)
    assert str(err.value) == (
        "the minion cannot start in the guest vm1: installing Salt failed: cannot [31m reach X"
    )
    check.close()
    assert stream.aborted


def test_the_console_keeps_a_bounded_tail():
    from salt_kvm.virt import console

    stream = Stream([b"x" * 4096] * 10)
    tail = console.ConsoleTail(Dom(stream))
    assert len(tail.poll()) == console.KEEP


def test_the_installer_finds_the_wheelhouses_newest_pip_wheel():
    names = {}
    exec(saltsource.INSTALLER_TEXT.replace("\nmain()\n", "\n"), names)
    listing = (
        '<a href="pip-9.0.3-py3-none-any.whl">'
        '<a href="sub/pip-23.0.1-py3-none-any.whl">'
        '<a href="salt_pip-1.0-py3-none-any.whl"><a href="pip-24.0.tar.gz">'
    )
    assert names["pip_wheel"]("http://192.0.2.1/w/", listing) == (
        "pip-23.0.1-py3-none-any.whl",
        "http://192.0.2.1/w/sub/pip-23.0.1-py3-none-any.whl",
    )
    assert names["pip_wheel"]("http://192.0.2.1/w/", '<a href="salt-3008.3.whl">') is None

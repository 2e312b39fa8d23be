import io

import pycdlib
import yaml

from salt_kvm.cloud import seed


def read_iso(data: bytes) -> tuple[str, dict[str, bytes]]:
    image = pycdlib.PyCdlib()
    image.open_fp(io.BytesIO(data))
    label = image.pvd.volume_identifier.decode().strip()
    files = {}
    for name in ("user-data", "meta-data", "network-config"):
        out = io.BytesIO()
        try:
            image.get_file_from_iso_fp(out, rr_path=f"/{name}")
        except pycdlib.pycdlibexception.PyCdlibInvalidInput:
            continue
        files[name] = out.getvalue()
    image.close()
    return label, files


def test_nocloud_seed_is_a_cidata_iso_with_cloud_config():
    label, files = read_iso(seed.nocloud("vm1.example.com", {"runcmd": [["true"]]}))
    assert label == "cidata"
    assert files["user-data"].startswith(b"#cloud-config\n")
    assert yaml.safe_load(files["user-data"]) == {"runcmd": [["true"]]}
    meta = yaml.safe_load(files["meta-data"])
    assert meta["local-hostname"] == "vm1" and meta["instance-id"].startswith("vm1.example.com-")
    assert "network-config" not in files


def test_every_seed_has_a_new_instance_id_and_optional_network_config():
    one = yaml.safe_load(read_iso(seed.nocloud("vm1", {}))[1]["meta-data"])
    _, files = read_iso(seed.nocloud("vm1", {}, {"version": 2}))
    two = yaml.safe_load(files["meta-data"])
    assert one["instance-id"] != two["instance-id"]
    assert yaml.safe_load(files["network-config"]) == {"version": 2}

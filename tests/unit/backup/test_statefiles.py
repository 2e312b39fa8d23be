"""The manifest's ``firmware`` field (UEFI variables, TPM state): checked
field by field, absent in older manifests, refused by name when it does not fit."""

import json

import pytest

from salt_kvm.backup import statefiles as sf
from salt_kvm.backup import store as bs
from tests.unit.backup.test_store import point

DIGEST = "ab" * 32


def state():
    return {
        "consistency": "settled",
        "nvram": {"file": "nvram.fd", "size": 540672, "sha256": DIGEST},
        "tpm_version": "2.0",
        "tpm": {
            "tpm2/tpm2-00.permall": {
                "file": "tpm.tpm2_tpm2-00.permall",
                "size": 9000,
                "sha256": DIGEST,
            }
        },
    }


def test_a_firmware_state_round_trips_through_the_manifest():
    made = point("20261121T041100Z")
    made.firmware = sf.parse_firmware(state())
    data = json.loads(json.dumps(made.to_dict()))
    assert data["firmware"] == state()
    parsed = bs.parse_manifest(data, made.id, "vm")
    assert parsed.firmware == made.firmware
    assert bs.Point.from_dict(data) == made
    assert [f.file for f in parsed.firmware.files()] == ["nvram.fd", "tpm.tpm2_tpm2-00.permall"]


def test_an_older_manifest_has_no_firmware():
    data = point("20261121T041100Z").to_dict()
    del data["firmware"]
    assert bs.parse_manifest(data, "20261121T041100Z", "vm").firmware is None
    assert bs.Point.from_dict(data).firmware is None


def test_only_nvram_or_only_tpm():
    data = state()
    del data["tpm"], data["tpm_version"]
    assert sf.parse_firmware(data).tpm == {}
    data = state()
    del data["nvram"]
    assert sf.parse_firmware(data).nvram is None


@pytest.mark.parametrize(
    "change, key, accepted",
    [
        ({"consistency": "live"}, "firmware.consistency", "shut-off, settled"),
        (
            {"nvram": {"file": "/etc/shadow", "size": 1, "sha256": DIGEST}},
            "firmware.nvram.file",
            "nvram.fd",
        ),
        (
            {"nvram": {"file": "nvram.fd", "size": 2**30, "sha256": DIGEST}},
            "firmware.nvram.size",
            "0 to 67108864 bytes",
        ),
        (
            {"nvram": {"file": "nvram.fd", "size": True, "sha256": DIGEST}},
            "firmware.nvram.size",
            None,
        ),
        (
            {"nvram": {"file": "nvram.fd", "size": 1, "sha256": "AB" * 32}},
            "firmware.nvram.sha256",
            None,
        ),
        ({"nvram": "nvram.fd"}, "firmware.nvram", "file, size, sha256"),
        ({"tpm_version": None}, "firmware.tpm_version", "2.0, 1.2"),
        ({"tpm": {}}, "firmware.tpm", None),
        ({"tpm": {"../tpm2-00.permall": {}}}, "firmware.tpm", "tpm2/<file name>"),
        ({"tpm": {"tpm2/.lock": {}}}, "firmware.tpm", None),
        ({"tpm": {"tpm2/a/b": {}}}, "firmware.tpm", None),
        (
            {"tpm": {"tpm2/x": {"file": "tpm.tpm2_y", "size": 1, "sha256": DIGEST}}},
            "firmware.tpm.tpm2/x.file",
            "tpm.tpm2_x",
        ),
        (
            {"tpm": {"tpm2/x": {"file": "tpm.tpm2_x", "size": 5 * 2**20, "sha256": DIGEST}}},
            "firmware.tpm.tpm2/x.size",
            None,
        ),
    ],
)
def test_a_field_that_does_not_fit_is_refused_by_name(change, key, accepted):
    made = point("20261121T041100Z").to_dict()
    made["firmware"] = {**state(), **change}
    with pytest.raises(bs.ManifestError) as raised:
        bs.parse_manifest(made, "20261121T041100Z", "vm")
    assert raised.value.key == key
    assert str(raised.value).startswith(f"backup point 20261121T041100Z: {key}: ")
    if accepted:
        assert str(raised.value).endswith(f"(accepted: {accepted})")


def test_too_many_tpm_files_are_refused():
    entry = {"size": 1, "sha256": DIGEST}
    many = {f"tpm2/f{i}": {**entry, "file": f"tpm.tpm2_f{i}"} for i in range(17)}
    with pytest.raises(sf.FirmwareError, match="firmware.tpm: is not a map of files"):
        sf.parse_firmware({**state(), "tpm": many})


def test_not_an_object():
    with pytest.raises(sf.FirmwareError, match="firmware: 'x' is not a JSON object"):
        sf.parse_firmware("x")

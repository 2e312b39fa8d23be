"""A guest whose minion key id is not its name (``minion: {id: ...}`` or
``append_domain``) has that id recorded with it, so that ``-d`` removes that
key too and leaves no accepted key behind on the master."""

from salt_kvm.cloud import actions, provision
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback
from tests.functional.cloud.test_provision import spec


def test_the_minion_id_is_recorded_and_destroy_reports_it(conn, pool, base):
    record = {"minion_id": "vm1.example.com"}
    guest = provision.create(conn, spec(), Rollback(), lambda *a: None, record=record)
    assert Domain(guest.domain.XMLDesc(0)).managed_info()["minion_id"] == "vm1.example.com"
    assert actions.destroy(conn, "vm1", False)["minion_id"] == "vm1.example.com"


def test_a_guest_named_as_its_minion_records_nothing(conn, pool, base):
    guest = provision.create(conn, spec(), Rollback(), lambda *a: None)
    assert "minion_id" not in Domain(guest.domain.XMLDesc(0)).managed_info()
    assert "minion_id" not in actions.destroy(conn, "vm1", False)

"""The integration tests' host ports: one table (tests/integration/saltenv.py),
ranges that never overlap and fit one process's span, and the streams of
scripts/run-integration at least that span apart, so two processes never
bind the same port (a stream's mirror once took the other stream's master)."""

import re
from pathlib import Path

import pytest

from tests.integration import saltenv

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_the_ranges_fit_the_span_and_never_overlap():
    taken = {}
    for name, (first, count) in saltenv.PORT_RANGES.items():
        assert count >= 1 and 0 <= first and first + count <= saltenv.PORT_SPAN, name
        for offset in range(first, first + count):
            assert offset not in taken, f"{name} and {taken.get(offset)} share +{offset}"
            taken[offset] = name


def test_a_port_outside_its_range_is_refused():
    with pytest.raises(IndexError, match="mirror has 1 port"):
        saltenv.port("mirror", 1)


def test_the_streams_are_a_span_apart():
    script = (ROOT / "scripts" / "run-integration").read_text()
    gaps = [int(n) for n in re.findall(r'"\$\(\(BASE \+ (\d+)\)\)"', script)]
    assert gaps and all(gap >= saltenv.PORT_SPAN for gap in gaps)


def test_integration_modules_take_their_ports_from_the_table():
    for path in (ROOT / "tests" / "integration").glob("*.py"):
        if path.name == "saltenv.py":
            continue
        text = path.read_text()
        assert not re.search(r"PORT_BASE\s*\+|port_offset=\d", text), path.name

"""Every test is marked with its tier from the folder it lives in."""

from pathlib import Path

import pytest

TIERS = ("unit", "functional", "integration")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))

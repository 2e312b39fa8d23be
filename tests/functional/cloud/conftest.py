"""Fixtures of the several-host tests (tests/functional/cloud/twohosts.py)."""

from .twohosts import hosts, provider  # noqa: F401 - fixtures

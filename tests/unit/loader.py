"""Loader modules as Salt loads them, for unit tests through Salt's loader
mock (pytest-salt-factories' ``configure_loader_modules`` fixture).

``_modules/`` and ``_states/`` are not a package of this tree (installed, they
ship as ``salt_kvm._modules``/``salt_kvm._states``): they are loaded from
their files here, so the tests run this checkout's code."""

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest

# The loader mock (configure_loader_modules) is pytest-salt-factories' plugin:
# pip install -e '.[test]'. Without it these modules are reported skipped.
pytest.importorskip("saltfactories", reason="needs pytest-salt-factories (the test extra)")

REPO = Path(__file__).resolve().parents[2]


def load(kind: str, name: str):
    """``_modules/<name>.py`` (kind "modules") or ``_states/<name>.py``, imported
    once per test session under a name of its own."""
    module_name = f"salt_kvm_test_{kind}_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / f"_{kind}" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def no_connection(*_args, **_kwargs):
    """Stands for ``saltutil.connection_for`` / the driver's connection: the
    library functions it feeds are replaced by the test, nothing connects."""
    return contextlib.nullcontext(object())


def raising(exc):
    """A library function that fails with ``exc``."""

    def fail(*_args, **_kwargs):
        raise exc

    return fail


def never(*_args, **_kwargs):
    raise AssertionError("nothing may change")

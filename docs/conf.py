"""Sphinx configuration for salt-kvm's documentation."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _load(alias: str, path: Path) -> None:
    """Import a loader module under a unique name so autodoc can read it.

    ``_modules/kvm_host.py`` and ``_states/kvm_host.py`` share a file name, as
    Salt expects, so they cannot both be imported by their plain names.
    """
    spec = importlib.util.spec_from_file_location(alias, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)


for kind in ("_modules", "_states"):
    for source in sorted((ROOT / kind).glob("[!_]*.py")):
        _load(f"salt_kvm_docs{kind}.{source.stem}", source)

from salt_kvm import __version__  # noqa: E402

project = "salt-kvm"
author = "salt-kvm developers"
release = version = __version__
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
exclude_patterns = ["_build"]
html_theme = "alabaster"

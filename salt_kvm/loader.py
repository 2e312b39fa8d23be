"""The ``salt.loader`` entry point: where Salt finds salt-kvm's loader modules."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _first_dir(*candidates: Path) -> list[str]:
    return [str(c) for c in candidates if c.is_dir()][:1]


def get_loader_dirs() -> dict[str, list[str]]:
    """Return the loader directories for each Salt loader type.

    ``_modules`` and ``_states`` sit at the top of the source tree (so they can
    be synced the classic way) and inside the package once installed; an
    editable install finds them next to the package.
    """
    return {
        "clouds": _first_dir(_PACKAGE / "clouds"),
        "modules": _first_dir(_PACKAGE / "_modules", _PACKAGE.parent / "_modules"),
        "states": _first_dir(_PACKAGE / "_states", _PACKAGE.parent / "_states"),
    }

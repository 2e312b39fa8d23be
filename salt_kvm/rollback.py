"""Undo what a half-done operation created, newest first."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Rollback:
    """Record an undo step for everything created; ``run()`` undoes them all.

    Used as a context manager, an exception inside the block triggers the undo
    steps and is re-raised; undo failures are logged, never raised over the
    original error (the cause is what the user needs to see).
    """

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def add(self, what: str, undo: Callable[[], object]) -> None:
        self._steps.append((what, undo))

    def run(self) -> list[str]:
        failed = []
        while self._steps:
            what, undo = self._steps.pop()
            try:
                undo()
                log.info("rolled back: %s", what)
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest
                log.error("could not roll back %s: %s", what, exc)
                failed.append(what)
        return failed

    def forget(self) -> None:
        """The operation succeeded: keep what it created."""
        self._steps.clear()

    def __enter__(self) -> Rollback:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.run()

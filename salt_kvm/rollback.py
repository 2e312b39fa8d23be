"""Undo what a half-done operation created, newest first."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Rollback:
    """Record an undo step for everything created; ``run()`` undoes them all.

    Used as a context manager, an exception inside the block triggers the undo
    steps and is re-raised; undo failures are logged, never raised over the
    original error (the cause is what the user needs to see).

    ``reconnect`` opens a new libvirt connection: undo steps that go through
    :meth:`live` still work when the failure was the connection itself
    (libvirtd restarted half-way).
    """

    def __init__(self, reconnect: Callable[[], Any] | None = None) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []
        self._reconnect = reconnect
        self._fresh: Any = None
        self.failed: list[str] = []  # what the last run could not undo

    def live(self, conn: Any) -> Any:
        """``conn`` if it still answers, else a new connection (made once)."""
        if self._reconnect is None or _alive(conn):
            return conn
        if self._fresh is None or not _alive(self._fresh):
            log.warning("the libvirt connection broke; reconnecting to undo")
            self._fresh = self._reconnect()
        return self._fresh

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
        if self._fresh is not None:
            try:
                self._fresh.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            self._fresh = None
        self.failed = failed
        return failed

    def forget(self) -> None:
        """The operation succeeded: keep what it created."""
        self._steps.clear()

    def __enter__(self) -> Rollback:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.run()


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except Exception:  # noqa: BLE001 - a closed or broken connection
        return False

"""Undo what a half-done operation created, newest first."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)
# What a user (Ctrl-C), a supervisor (kill, timeout) or a closed terminal sends.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A signal stopped the operation. A BaseException, like KeyboardInterrupt:
    ``except Exception`` handlers do not swallow it, ``Rollback`` undoes on it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def interruptible(signals: tuple = INTERRUPTS) -> Iterator[None]:
    """While the block runs, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`
    wherever the code is, so the rollback runs as for any failure; without this
    a SIGTERM kills the process with half a guest made. Further interrupts
    while it undoes are noted, not raised.

    On the way out the previous handlers come back and an interrupt that
    stopped the block is sent again, so the process then does what it would
    have done (salt-cloud's handler exits, the default one dies by the signal).
    A signal the process ignored stays ignored. Only the main thread can take
    signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    first: list[int] = []

    def handler(signum, _frame):
        if first:  # already stopping: let the rollback finish
            log.warning(
                "%s received while rolling back; still undoing", signal.Signals(signum).name
            )
            return
        first.append(signum)
        raise Interrupted(signum)

    previous = {}
    for signum in signals:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    except Interrupted as exc:
        _restore(previous)
        previous = {}
        log.warning("%s: what this run created was removed", exc)
        os.kill(os.getpid(), exc.signum)  # the previous disposition acts now
        raise  # it did not stop the process: the caller sees the interrupt
    finally:
        _restore(previous)


def _restore(previous: dict) -> None:
    for signum, old in previous.items():
        signal.signal(signum, old if old is not None else signal.SIG_DFL)


class Rollback:
    """Record an undo step for everything created; ``run()`` undoes them all.

    Used as a context manager, an exception inside the block triggers the undo
    steps and is re-raised; undo failures are logged, never raised over the
    original error (the cause is what the user needs to see).

    ``reconnect`` opens a new libvirt connection: undo steps that go through
    :meth:`live` still work when the failure was the connection itself
    (libvirtd restarted half-way).
    """

    def __init__(self, reconnect: Callable[[], Any] | None = None, journal: Any = None) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []
        self._reconnect = reconnect
        self._fresh: Any = None
        self.failed: list[str] = []  # what the last run could not undo
        # An intent journal (salt_kvm.cloud.intent.Journal): what SIGKILL would leave.
        self.journal = journal

    def intend(self, kind: str, **fields: Any) -> None:
        """Write down what is about to be made, before it is made: after a
        SIGKILL no undo step runs, the journal tells the next run what to undo."""
        if self.journal is not None:
            self.journal.intend(kind, **fields)

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
        """Undo every step, newest first. Interrupts wait until the undo is
        done (a second Ctrl-C must not leave half a rollback); they are
        delivered when it returns."""
        with _signals_held():
            return self._run()

    def _run(self) -> list[str]:
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
        if not failed and self.journal is not None:
            self.journal.clear()  # everything undone: nothing for a later run
        return failed

    def forget(self) -> None:
        """The operation succeeded: keep what it created."""
        self._steps.clear()
        if self.journal is not None:
            self.journal.clear()

    def __enter__(self) -> Rollback:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.run()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except Exception:  # noqa: BLE001 - a closed or broken connection
        return False

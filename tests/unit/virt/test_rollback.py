import pytest

from salt_kvm.virt.rollback import Rollback


def test_undo_runs_newest_first_and_reraises():
    done = []
    with pytest.raises(RuntimeError, match="boom"):
        with Rollback() as rb:
            rb.add("a", lambda: done.append("a"))
            rb.add("b", lambda: done.append("b"))
            raise RuntimeError("boom")
    assert done == ["b", "a"]


def test_failing_undo_does_not_hide_the_cause_and_others_still_run():
    done = []

    def broken():
        raise OSError("undo failed")

    rb = Rollback()
    rb.add("a", lambda: done.append("a"))
    rb.add("broken", broken)
    assert rb.run() == ["broken"]
    assert done == ["a"]


def test_forget_keeps_everything():
    done = []
    with Rollback() as rb:
        rb.add("a", lambda: done.append("a"))
        rb.forget()
    assert rb.run() == []
    assert done == []


# ---- interrupts (issue #13 item 11): a signal is a failure like any other ----

CHILD = """
import os, signal, sys, time
from salt_kvm.virt.rollback import Rollback, interruptible
# Ctrl-C and a hangup as in a terminal, whatever started this test: a shell's
# background job inherits SIGINT ignored, a run under nohup SIGHUP, and an
# ignored signal stays ignored (tested below).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
{setup}
log = open(sys.argv[1], "a", buffering=1)

def undo(what):
    if what == "slow":
        os.kill(os.getpid(), signal.{second})  # a second Ctrl-C while undoing
        time.sleep(0.2)
    log.write(what + "\\n")

with interruptible():
    with Rollback() as rb:
        rb.add("volume", lambda: undo("volume"))
        rb.add("slow", lambda: undo("slow"))
        rb.add("domain", lambda: undo("domain"))
        os.kill(os.getpid(), signal.{first})
        time.sleep(2)
        log.write("not interrupted\\n")
log.write("after the block\\n")
"""


def _child(tmp_path, first, second="SIGINT", setup=""):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(first=first, second=second, setup=setup))
    log = tmp_path / "log"
    proc = subprocess.run(
        [sys.executable, str(script), str(log)],
        env={"PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, (log.read_text().split() if log.exists() else [])


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_termination_signal_rolls_back_then_ends_the_process_by_that_signal(tmp_path, signame):
    import signal

    proc, done = _child(tmp_path, signame)
    assert done == ["domain", "slow", "volume"], proc.stderr
    assert proc.returncode == -getattr(signal, signame)


def test_ctrl_c_rolls_back_even_when_pressed_again_during_the_undo(tmp_path):
    proc, done = _child(tmp_path, "SIGINT", "SIGINT")
    assert done == ["domain", "slow", "volume"], proc.stderr
    assert "KeyboardInterrupt" in proc.stderr


def test_the_callers_own_handler_acts_after_the_rollback(tmp_path):
    """salt-cloud installs a SIGTERM handler that exits: it still runs, after the undo."""
    setup = "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))"
    proc, done = _child(tmp_path, "SIGTERM", setup=setup)
    assert done == ["domain", "slow", "volume"], proc.stderr
    assert proc.returncode == 7


def test_an_ignored_signal_stays_ignored(tmp_path):
    setup = "signal.signal(signal.SIGHUP, signal.SIG_IGN)"
    proc, done = _child(tmp_path, "SIGHUP", setup=setup)
    assert done == ["not", "interrupted", "after", "the", "block"], proc.stderr

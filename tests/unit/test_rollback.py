import pytest

from salt_kvm.rollback import Rollback


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

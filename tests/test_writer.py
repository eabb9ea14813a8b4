"""The loop's writer thread (stability/writer.py): tasks in order, drain, a task's exception
raised in the submitting thread with the tasks after it skipped."""

import threading

import pytest

from stability.writer import Writer


def test_tasks_run_in_order_off_the_submitting_thread_and_drain_waits_for_them():
    w, seen = Writer(), []
    gate = threading.Event()
    w.submit(gate.wait)
    for i in range(5):
        w.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert seen == []  # the writer waits at the gate; every submit returned
    gate.set()
    w.drain()
    assert [i for i, _ in seen] == list(range(5))
    assert {name for _, name in seen} == {"stability-writer"}
    w.close()


def test_an_error_is_raised_once_in_the_submitting_thread_and_later_tasks_are_skipped():
    w, seen = Writer(), []

    def fail():
        raise OSError("disk full")

    w.submit(fail)
    w.submit(seen.append, 1)
    with pytest.raises(OSError, match="disk full"):
        w.drain()
    w.submit(seen.append, 2)
    w.close()
    assert seen == []

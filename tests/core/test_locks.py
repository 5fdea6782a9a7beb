"""KeyedLocks: one holder per key, independent keys, and no entry left behind."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from e2ee.core.locks import KeyedLocks


class Interrupted(Exception):
    pass


def test_one_holder_per_key_and_the_table_empties() -> None:
    locks = KeyedLocks()
    inside = 0
    most = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(200):
            with locks.hold("bob"):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
    assert locks.active() == 0


def test_a_waiter_interrupted_by_a_signal_leaves_no_entry() -> None:
    locks = KeyedLocks()
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with locks.hold("bob"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted), locks.hold("bob"):
            pytest.fail("the lock was held by the other thread")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert locks.active() == 1  # the holder only; the interrupted waiter is gone
    release.set()
    thread.join()
    assert locks.active() == 0
    with locks.hold("bob"):  # and the key is usable again
        assert locks.active() == 1

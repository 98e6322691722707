"""The daemon's main loop is woken from signal handlers without ever blocking in one."""

from __future__ import annotations

import subprocess
import sys

SIGNAL_AT_EVERY_LINE = """
import faulthandler, signal, sys
from sovbackupd.daemon import Waker

faulthandler.dump_traceback_later(60, exit=True)  # a deadlock fails, with its stack
waker = Waker()
handled = 0
inside = False

def handler(signum, frame):
    global handled, inside
    inside = True
    try:
        waker.wake()
        handled += 1
    finally:
        inside = False

def tracer(frame, event, arg):
    # A signal at every line the loop runs, in Waker's code and in everything it calls.
    if inside:
        return None
    if event == "line":
        signal.raise_signal(signal.SIGUSR1)
    return tracer

signal.signal(signal.SIGUSR1, handler)
sys.settrace(tracer)
for _ in range(50):
    waker.wait(0)
    waker.wait(0.001)
sys.settrace(None)
print(handled)
"""


def test_a_signal_at_any_line_of_the_wait_only_wakes_it() -> None:
    """A signal handler that wakes the loop never waits for anything the loop holds.

    The script delivers a signal at every line the waiting thread runs, so that a
    handler lands inside every lock the wait takes. With a threading.Event as the
    waker (as the daemon had), the handler's set() waits for the Event's own lock,
    held by the thread it interrupted, and the script hangs at the first such line:
    that is how a storm of SIGHUPs stopped the daemon's main loop.
    """
    completed = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_EVERY_LINE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert int(completed.stdout) > 100

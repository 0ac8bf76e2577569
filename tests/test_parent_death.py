"""A child started with ``die_with_parent()`` never outlives its parent: not even when the
parent is killed between the fork and the child's asking for the signal, which is where a
supervisor killed as it starts its workers left one running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from .conftest import alive, children_of

# The middle process stands for the supervisor. Its child waits, before exec, until the
# middle has been killed, and only then arms: the signal it asks for can no longer come.
MIDDLE = textwrap.dedent("""
    import os, subprocess, sys, time
    from gateway.streaming import die_with_parent

    arm = die_with_parent()
    middle = os.getpid()

    def late() -> None:
        while os.getppid() == middle:
            time.sleep(0.01)
        arm()

    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=late)
    time.sleep(120)
""")


def test_a_child_whose_parent_dies_before_it_arms_leaves_at_once() -> None:
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], start_new_session=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while not children:
            assert middle.poll() is None, "the middle process died on its own"
            assert time.monotonic() < deadline, "the middle process never forked its child"
            time.sleep(0.05)
            children = children_of(middle.pid)
        middle.kill()
        middle.wait()
        deadline = time.monotonic() + 10
        while alive(children[0]):
            assert time.monotonic() < deadline, "the child outlived its parent, which died before it armed"
            time.sleep(0.05)
    finally:
        middle.kill()
        middle.wait()
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

"""Loader worker processes die with the process that started them.

A trainer killed with SIGKILL (the OOM killer does this) runs no clean-up: its DALI workers would block on their
task queues for ever and its DataLoader workers would linger until their watchdog notices (seconds), holding
memory and file handles. Each worker asks Linux, as it starts, for SIGKILL when its parent dies
(prctl PR_SET_PDEATHSIG), then checks that the parent is still there, since it may have died before the request
took effect.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.util
import os
import signal
import sys

from stenvan.lock import pid_exists

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Call in a worker process of `parent_pid`: SIGKILL it when the parent dies, and exit now if the parent is
    gone already (the worker was re-parented).

    Linux sends the signal when the *thread* that created the worker ends, so workers must be started from a
    thread that lives as long as the process (the loaders start them from the caller's, the main thread).
    No-op in the parent itself, in a process that is not its child while it lives, and outside Linux.
    """
    if os.getpid() == parent_pid or not sys.platform.startswith("linux"):
        return
    if os.getppid() != parent_pid:
        if pid_exists(parent_pid):
            return  # not its child (e.g. an object unpickled elsewhere): nothing to tie
        os._exit(1)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"stenvan: warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(err)}); this loader worker "
              "may outlive a killed trainer", file=sys.stderr)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class _Lifeline:
    def __init__(self, parent_pid: int):
        self.parent_pid = parent_pid

    def arm(self) -> None:
        die_with_parent(self.parent_pid)


@contextlib.contextmanager
def forked_children_die_with_us():
    """Multiprocessing children *forked* inside the block call `die_with_parent` as they start.

    multiprocessing runs its after-fork hooks in every child it forks; the registry holds the hook's object
    weakly, so forks after the block (e.g. DataLoader workers, which arm themselves) are not affected. Spawned
    children start a fresh interpreter without the hook: they must arm themselves (the DALI sources do so when
    they are unpickled in the worker).
    """
    lifeline = _Lifeline(os.getpid())
    multiprocessing.util.register_after_fork(lifeline, _Lifeline.arm)
    try:
        yield
    finally:
        del lifeline

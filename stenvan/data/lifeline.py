"""Loader worker processes live and die with the process that started them, and only with it.

A trainer killed with SIGKILL (the OOM killer does this) runs no clean-up: its DALI workers would block on their
task queues for ever and its DataLoader workers would linger until their watchdog notices (seconds), holding
memory and file handles. Each worker asks Linux, as it starts, for SIGKILL when its parent dies
(prctl PR_SET_PDEATHSIG), then checks that the parent is still there, since it may have died before the request
took effect.

The other way round, a stop meant for the trainer must not kill its workers: torchrun stops its workers with
`os.killpg`, a terminal's Ctrl-C goes to the whole foreground process group and SLURM signals every process of a
job step, so SIGTERM/SIGINT reach the loader workers too. Dead workers would fail the trainer's next batch
("Worker data receiving interrupted") before it could save its checkpoint. So a worker ignores SIGINT and SIGTERM
from anyone but its parent; its parent may still end it with them (DALI's pool and the DataLoader stop their
workers with SIGTERM, and a worker that ignored that would hang them).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.resource_tracker
import multiprocessing.util
import os
import signal
import sys
import threading

from stenvan.lock import pid_exists

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what the trainer saves and stops on (stenvan.training.trainer)


def tie_to_parent(parent_pid: int) -> None:
    """Call in a worker process of `parent_pid`, as it starts: SIGKILL it when the parent dies (and exit now if the
    parent is gone already: the worker was re-parented), and let only the parent stop it with SIGINT/SIGTERM.

    Linux sends the SIGKILL when the *thread* that created the worker ends, so workers must be started from a
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
    _stop_only_for(parent_pid)


def _stop_only_for(parent_pid: int) -> None:
    """SIGINT and SIGTERM end this process only when `parent_pid` sent them; from anyone else (torchrun's killpg,
    the terminal, a scheduler) they are dropped.

    A signal handler cannot tell who sent a signal, `sigwaitinfo` can: both signals are blocked, and one thread
    takes them as they come. They must be blocked in every thread of the worker, or one that does not would die
    of them: the worker started with them blocked (`start_workers`: a signal mask is inherited through fork and
    exec, so threads started before this, e.g. a spawned interpreter's OpenBLAS threads, block them too), and
    this thread blocks them for those it starts. `os._exit` as for an unhandled SIGTERM: no clean-up in a worker
    its parent ends.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def take_signals():
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_pid == parent_pid:
                os._exit(128 + info.si_signo)

    threading.Thread(target=take_signals, name="stenvan-stop-signals", daemon=True).start()


class _Lifeline:
    def __init__(self, parent_pid: int):
        self.parent_pid = parent_pid

    def arm(self) -> None:
        tie_to_parent(self.parent_pid)


@contextlib.contextmanager
def start_workers(tie_forked: bool = True, spawn: bool = False):
    """Start loader workers inside the block: they start with SIGINT/SIGTERM blocked (this thread's mask for the
    block's duration, which they inherit), and, with `tie_forked`, multiprocessing children *forked* inside the
    block call `tie_to_parent` as they start. `spawn`: they are spawned (multiprocessing's resource tracker is
    started first: starting it unblocks both signals in the calling thread).

    multiprocessing runs its after-fork hooks in every child it forks; the registry holds the hook's object
    weakly, so forks after the block are not affected. Spawned children start a fresh interpreter without the
    hook, and DataLoader workers run a `worker_init_fn`: they call `tie_to_parent` themselves (the DALI sources
    when they are unpickled in the worker, `stenvan.data.loader` from its worker_init_fn). A stop signal that
    arrives meanwhile waits for the block's end.
    """
    lifeline = _Lifeline(os.getpid())
    if spawn:
        multiprocessing.resource_tracker.ensure_running()
    if tie_forked:
        multiprocessing.util.register_after_fork(lifeline, _Lifeline.arm)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        del lifeline

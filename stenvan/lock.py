"""An exclusive lock on a folder (a prepared dataset's `--out`, a training run folder): one writer at a time.

The lock is the file `<folder>/.lock`, a small JSON record of its holder: host, pid, the process's start time
and boot id (so a pid reused by another process is not mistaken for the holder), what it is doing and since
when. It is taken atomically: the record is written to a temporary file and hard-linked to `.lock`, and
`link` fails when the name exists (on local filesystems and NFS alike), so two processes never both succeed.

- A lock whose holder ran on this host and is no longer running is stale (its process was killed): it is
  taken over, and `log` gets one line saying so.
- A lock held from another host cannot be checked from here: `acquire` refuses, naming the host, the pid
  and how to clear the lock once that process is known to be gone.

    with FolderLock(out_dir, "prepare"):        # LockError if another process holds it
        ...
    lock = FolderLock(run_dir, "train.py").acquire()   # e.g. on rank 0 only; lock.release() at exit

Forked children (worker pools) inherit the object but never release the parent's lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

LOCK_NAME = ".lock"
EMPTY_LOCK_S = 2.0  # a lock file empty for this long has no record on its way (it is written right after creation)


class LockError(Exception):
    """The folder is locked by another process; the message names the holder and what to do."""


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _me(what: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
            "boot_id": _boot_id(), "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def holder_is_running(holder: dict) -> bool | None:
    """True / False for a holder on this host; None when it ran on another host (cannot be checked here)."""
    if holder.get("host") != socket.gethostname():
        return None
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return False  # this machine rebooted since: every process of that boot is gone
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not pid_exists(pid):
        return False
    recorded, now = holder.get("start_ticks"), _start_ticks(pid)
    return not (recorded is not None and now is not None and recorded != now)  # else: the pid was reused


@contextlib.contextmanager
def _takeover_guard(folder: Path):
    """Serialise stale-lock takeovers within this host (flock on the folder); released even if we die."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # no flock here: a takeover race then needs two takers within the same instant
        yield
    finally:
        os.close(fd)


def _describe(holder: dict) -> str:
    return f"{holder.get('what', '?')} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})"


class FolderLock:
    """`FolderLock(folder, what).acquire()` / `.release()`, or `with FolderLock(folder, what): ...`."""

    def __init__(self, folder: str | os.PathLike, what: str, log: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self._record: bytes | None = None  # what we wrote, while we hold the lock
        self._owner = 0  # pid that acquired it (forked children must not release it)

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _empty_for(self, seconds: float) -> bool:
        """The lock file is still empty and was last written `seconds` ago or more (no record is on its way)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        return st.st_size == 0 and time.time() - st.st_mtime >= seconds

    def _try_link(self, record: bytes) -> bool:
        tmp = self.folder / f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(record)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:  # a filesystem without hard links: exclusive create (the record lands just after)
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(record)
            return True
        finally:
            tmp.unlink()

    def acquire(self) -> "FolderLock":
        """Take the lock or raise LockError; a stale lock of a dead process on this host is taken over."""
        self.folder.mkdir(parents=True, exist_ok=True)
        me = _me(self.what)
        record = (json.dumps(me, sort_keys=True) + "\n").encode()
        stale = None
        for _ in range(5):
            if self._try_link(record):
                self._record, self._owner = record, os.getpid()
                if stale is not None:
                    self.log(f"{self.path}: took over the stale lock of {_describe(stale)}: that process is no "
                             "longer running")
                return self
            raw = self._read()
            if not raw:  # released meanwhile, or (no hard links) its record is being written: try again
                if raw is not None and self._empty_for(EMPTY_LOCK_S):
                    raise LockError(f"{self.path}: exists but is empty, not a lock record (a writer killed while "
                                    f"creating it, or a file made by hand); if no prepare or training is using "
                                    f"{self.folder}, delete {self.path}; rerunning alone will not help")
                time.sleep(0.05)
                continue
            try:
                holder = json.loads(raw)
                if not isinstance(holder, dict):
                    raise ValueError
            except ValueError:
                raise LockError(f"{self.path}: exists but is not a lock record; if no prepare or training is "
                                f"using {self.folder}, delete {self.path} and rerun") from None
            if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                raise LockError(f"{self.folder}: already locked by this process ({holder.get('what')})")
            running = holder_is_running(holder)
            if running is None:
                raise LockError(f"{self.folder}: locked by {_describe(holder)}; wait for it to finish, or, if "
                                f"no process on {holder.get('host')} uses this folder any more, delete {self.path} "
                                "and rerun")
            if running:
                raise LockError(f"{self.folder}: in use by {_describe(holder)}; wait for it to finish or stop it "
                                "(two writers would overwrite each other)")
            with _takeover_guard(self.folder):
                if self._read() == raw:  # still the same stale record (no other taker was first)
                    self.path.unlink()
            stale = holder
        raise LockError(f"{self.path}: could not take the lock (it keeps changing hands); rerun")

    def release(self) -> None:
        """Remove the lock if this process still holds it (a no-op in forked children)."""
        if self._record is None or os.getpid() != self._owner:
            return
        if not self.folder.is_dir():  # the folder itself was removed
            self._record = None
            return
        with _takeover_guard(self.folder):
            if self._read() == self._record:
                self.path.unlink()
            else:
                self.log(f"{self.path}: no longer ours (taken over by another process); left as it is")
        self._record = None

    @property
    def held(self) -> bool:
        return self._record is not None and os.getpid() == self._owner

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

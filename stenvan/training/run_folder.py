"""A training run's folder (`--out`) belongs to one run at a time: rank 0 claims it for the whole run.

`claim_run_folder` (rank 0 only, before anything is read or written there):
- takes the exclusive `FolderLock` (`<out>/.lock`, stenvan.lock): a second `train.py` on the same folder stops
  with one line naming the holder, instead of the two overwriting each other's checkpoints and logs. The lock
  of a process that no longer runs on this host (a SIGKILL, the OOM killer, a worker that torchrun restarts with
  --max-restarts) is taken over with a line saying so. Only rank 0 locks, so the ranks of other nodes never
  contend; a restart keeps rank 0 on its node while the set of nodes stays the same (torchrun orders the nodes
  the same way in every round). A lock held from another host is refused: it cannot be checked from here.
- removes what killed checkpoint writes left behind: our writer's temp files (hundreds of MB each), and only
  names our writer makes (`.step-*.pt.*.tmp`, `.best.pt.*.tmp`, their sidecars', `.last.pt.*.tmp`,
  `.config.yaml.*.tmp`), with a line listing them. Safe under the lock: no writer of ours runs there now.
- refuses a fresh start (no --resume) in a folder that holds checkpoints: its step numbers would mix with the
  earlier run's, and a later `--resume auto` could pick the earlier run's newest checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from stenvan.checkpoint import step_checkpoints
from stenvan.errors import describe_os_error
from stenvan.lock import FolderLock

# The temp names of stenvan.checkpoint's writes (tempfile.mkstemp: 8 of [a-z0-9_]; last.pt's link: the pid).
STALE_TEMP = re.compile(r"^\.(step-\d{9}\.pt|best\.pt|last\.pt|config\.yaml)(\.sha256)?\.[a-z0-9_]+\.tmp$")


class RunFolderError(Exception):
    """The run folder cannot be used by this run; the message says why and what to do."""


def claim_run_folder(run_dir: str | os.PathLike, fresh: bool, log: Callable[[str], None] = print) -> FolderLock:
    """Lock `run_dir` for this run (LockError if another run holds it), clean our stale temp files, and for a
    `fresh` start (no --resume) check that no earlier run's checkpoints are there. Returns the held lock."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: exists and is not a folder; --out names the run folder (checkpoints, "
                             "logs): choose another path")
    try:
        lock = FolderLock(run_dir, "train.py", log=log).acquire()  # the first write into the folder
    except OSError as e:  # read-only, not ours, full: name the folder, not the lock's temp file
        raise RunFolderError(describe_os_error(e, "rerun", what=f"{run_dir}: cannot write in the run folder")) \
            from None
    try:
        removed = remove_stale_temp_files(run_dir)
        if removed:
            log(f"{run_dir}: removed what killed checkpoint writes left: "
                + ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for name, size in removed))
        checkpoints = step_checkpoints(run_dir)
        if fresh and (checkpoints or (run_dir / "last.pt").exists()):
            newest = checkpoints[-1].name if checkpoints else "last.pt"
            raise RunFolderError(f"{run_dir}: holds the checkpoints of an earlier run (newest: {newest}); continue "
                                 "it with --resume auto, or start this run in another --out")
    except BaseException:
        lock.release()
        raise
    return lock


def remove_stale_temp_files(run_dir: Path) -> list[tuple[str, int]]:
    """Delete our checkpoint writer's temp files in `run_dir`; (name, bytes) of each. Call it under the lock."""
    removed = []
    for entry in os.scandir(run_dir):
        if STALE_TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
            removed.append((entry.name, size))
    return sorted(removed)

"""Where a synthetic dataset is written: all or nothing, one writer at a time, reruns answered in one line.

The tree is built in `PARENT/.NAME.synthetic-partial/` and renamed onto `--out` when complete, so `--out`
never holds half a dataset. The run writing the partial folder holds its `.lock` (stenvan.lock, the lock of
prepare's and train.py's folders too): a second run stops with one line naming the holder, and the lock of a
run that died however it died (SIGKILL included) is taken over, so the next run knows the folder is left over
from a dead run, empties it and starts again. `synthetic.json` in a finished tree records the options, so
rerunning the same command is a no-op and other options are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from stenvan.lock import LOCK_NAME, FolderLock, LockError

STAMP = "synthetic.json"


def read_stamp(out: Path) -> dict | None:
    """The stamp of a finished synthetic tree in `out`, or None if there is none."""
    try:
        return json.loads((out / STAMP).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise FileExistsError(f"{out / STAMP}: unreadable ({e}); delete {out} or choose another --out") from e


def existing_result(out: Path, options: dict) -> dict | None:
    """The counts of a finished tree made with `options` in `out`; None if `out` is absent or empty.
    Raises FileExistsError for anything else in it."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file; synthetic data goes into a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    stamp = read_stamp(out)
    if stamp is None:
        raise FileExistsError(f"{out}: not empty; synthetic data goes into a new or empty folder")
    if stamp.get("options") != options:
        changed = sorted(k for k in set(options) | set(stamp.get("options", {}))
                         if options.get(k) != stamp.get("options", {}).get(k))
        raise FileExistsError(f"{out}: holds a synthetic dataset made with other options ({', '.join(changed)}); "
                              "delete it or choose another --out")
    return stamp["counts"]


class PartialFolder:
    """The locked working folder next to `out`; `commit()` renames it onto `out`, `discard()` removes it."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.synthetic-partial"
        self.lock: FolderLock | None = None

    def __enter__(self) -> "PartialFolder":
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = FolderLock(self.path, "prepare synthetic",
                                   log=lambda line: print(f"synthetic: {line}", file=sys.stderr)).acquire()
        except OSError as e:
            raise OSError(f"{self.path}: cannot create the working folder next to {self.out} "
                          f"({e.strerror}); choose an --out in a writable folder") from e
        except LockError as e:
            raise FileExistsError(f"{self.out}: another synthetic run is writing it: {e}") from None
        leftovers = [e for e in os.listdir(self.path) if e != LOCK_NAME]
        if leftovers:  # we hold the lock: whoever wrote these is gone
            print(f"synthetic: {self.path} holds the partial output of an interrupted run; removing it and "
                  "starting again", file=sys.stderr)
            self.clear()
        return self

    def clear(self) -> None:
        for entry in os.listdir(self.path):
            if entry != LOCK_NAME:
                p = self.path / entry
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def commit(self, stamp: dict) -> None:
        """Write the stamp, then move the finished tree onto `out` in one rename (replacing an empty folder)."""
        tmp = self.path / f".{STAMP}.tmp"
        tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path / STAMP)
        try:
            os.rename(self.path, self.out)
        except OSError as e:
            raise OSError(f"{self.out}: cannot move the finished dataset there from {self.path} ({e.strerror})"
                          ) from e
        # Our lock moved with the folder; no other run can have taken it in the meantime (we still hold it).
        os.unlink(self.out / LOCK_NAME)
        self.lock = None

    def discard(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()  # a no-op once discard() removed the folder
            self.lock = None

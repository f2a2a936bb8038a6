"""Which checkpoint a run continues from: decided once, on rank 0, and loaded by every rank.

Rank 0 alone touches the run folder: it claims it (`claim`, see stenvan.training.run_folder: the lock, stale temp
files), then, for `--resume auto`, picks the newest checkpoint that verifies (damaged newer ones are set aside as `.bad`,
unverified ones as `.unverified`, which two ranks doing at once would race on), then publishes its choice (path,
step, sha256) or its error in the run's key-value store. Every other rank loads that file and checks that it
holds the same bytes, and every rank reports back, so a rank that cannot read it (a run folder that is not on a
filesystem every node shares) stops the whole run with one clear line, rather than training from step 0 beside a
resumed rank 0; an error on rank 0 (the folder is locked by another run, a bad checkpoint) stops every rank with
rank 0's line.

The store is torchrun's (see `stenvan.distributed.rendezvous`): this runs before the process group and before
CUDA exist, because the loader must know the step to start from before its DALI workers fork.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from stenvan.checkpoint import (CheckpointError, newest_valid_checkpoint_and_digest, read_checkpoint_and_digest,
                                read_named_checkpoint)
from stenvan.errors import error_line
from stenvan.lock import LockError
from stenvan.training.run_folder import RunFolderError

KEY = "stenvan/resume"
# What rank 0 may fail with before any rank starts; the others stop with its line.
START_ERRORS = (CheckpointError, LockError, RunFolderError, OSError)


class RankZeroError(Exception):
    """Rank 0 could not start the run (its own line says why); raised on the other ranks."""


def choose_checkpoint(resume: str, run_dir) -> tuple[Path, dict, str] | None:
    """(path, state, sha256) to resume from: 'auto' = the newest valid one in `run_dir` (None if there is none),
    otherwise the file `resume` names (loaded with a warning if nothing verifies it). Call it in one process only
    (it renames damaged and unverified checkpoints)."""
    if resume != "auto":
        state, digest = read_named_checkpoint(resume, prefix="resume: ")
        return Path(resume), state, digest
    found = newest_valid_checkpoint_and_digest(run_dir)
    if found is None:
        print(f"resume: no checkpoint in {run_dir}, starting from scratch", flush=True)
    return found


def agree_on_checkpoint(resume: str | None, run_dir, store, rank: int, world_size: int,
                        claim: Callable[[], None] = lambda: None, dataset: str = "",
                        data: str = "") -> tuple[Path, dict] | None:
    """The checkpoint every rank resumes from, (path, state) or None; `store` is None in a world of one.
    Rank 0 calls `claim()` first (it takes the run folder's lock). Every rank also checks that its `data` holds
    rank 0's `dataset` (a fingerprint): a node with other data at that path would otherwise train on it."""
    if store is None:
        claim()
        found = choose_checkpoint(resume, run_dir) if resume else None
        return found and found[:2]
    found = None
    if rank == 0:
        try:
            claim()
            found = choose_checkpoint(resume, run_dir) if resume else None
            decision = {"path": None, "dataset": dataset} if found is None else \
                {"path": str(found[0]), "step": found[1]["progress"]["global_step"], "sha256": found[2],
                 "dataset": dataset}
        except BaseException as e:
            line = error_line(e, "rerun") if isinstance(e, START_ERRORS) else f"rank 0 failed: {type(e).__name__}: {e}"
            store.set(KEY, json.dumps({"error": line}))  # the others stop with the same line, not in 30 minutes
            raise
        store.set(KEY, json.dumps(decision))
    decision = json.loads(store.get(KEY))  # waits for rank 0
    if "error" in decision:
        raise RankZeroError(decision["error"])
    problem = ""
    if decision["dataset"] != dataset:
        problem = (f"rank {rank}: {data} holds another dataset than rank 0's (fingerprint {dataset[:12]}…, rank 0: "
                   f"{decision['dataset'][:12]}…); every node must read the same prepared dataset at that path")
    elif rank != 0 and decision["path"] is not None:
        problem, found = _load_chosen(decision)
        problem = problem and (f"resume: rank {rank} cannot use {decision['path']}, the checkpoint rank 0 chose: "
                               f"{problem}. The run folder (--out) must be on a filesystem that every node shares, "
                               "with the same path")
    store.set(f"{KEY}/rank{rank}", problem)
    # Every rank waits for every report, so that all of them stop, with the same line, if one cannot start.
    for r in range(world_size):
        report = store.get(f"{KEY}/rank{r}").decode()
        if report:
            raise CheckpointError(report)
    if found is not None:
        print(f"resume: rank {rank} loads {found[0]} (step {decision['step']}, sha256 {decision['sha256'][:12]})",
              file=sys.stderr, flush=True)
    return found and found[:2]


def _load_chosen(decision: dict) -> tuple[str, tuple | None]:
    """('', (path, state, sha256)) if this rank reads the same bytes rank 0 chose, else (what is wrong, None)."""
    path = Path(decision["path"])
    try:
        state, digest, _ = read_checkpoint_and_digest(path)
    except CheckpointError as e:
        return str(e), None
    if digest != decision["sha256"] or state["progress"]["global_step"] != decision["step"]:
        return (f"{path} holds other bytes here (step {state['progress']['global_step']}) than on rank 0 "
                f"(step {decision['step']})"), None
    return "", (path, state, digest)

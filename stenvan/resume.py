"""Which checkpoint a run continues from: decided once, on rank 0, and loaded by every rank.

Rank 0 alone looks at the run folder (`--resume auto`: the newest checkpoint that verifies; damaged newer ones
are set aside as `.bad`, which two ranks doing at once would race on), then publishes its choice (path, step,
sha256) in the run's key-value store. Every other rank loads that file and checks that it holds the same bytes,
and every rank reports back, so a rank that cannot read it (a run folder that is not on a filesystem every node
shares) stops the whole run with one clear line, rather than training from step 0 beside a resumed rank 0.

The store is torchrun's (see `stenvan.distributed.rendezvous`): this runs before the process group and before
CUDA exist, because the loader must know the step to start from before its DALI workers fork.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stenvan.checkpoint import CheckpointError, newest_valid_checkpoint_and_digest, read_checkpoint_and_digest

KEY = "stenvan/resume"


def choose_checkpoint(resume: str, run_dir) -> tuple[Path, dict, str] | None:
    """(path, state, sha256) to resume from: 'auto' = the newest valid one in `run_dir` (None if there is none),
    otherwise the file `resume` names. Call it in one process only (it renames damaged checkpoints)."""
    if resume != "auto":
        return (Path(resume), *read_checkpoint_and_digest(resume))
    found = newest_valid_checkpoint_and_digest(run_dir)
    if found is None:
        print(f"resume: no checkpoint in {run_dir}, starting from scratch", flush=True)
    return found


def agree_on_checkpoint(resume: str, run_dir, store, rank: int, world_size: int) -> tuple[Path, dict] | None:
    """The checkpoint every rank resumes from, (path, state) or None; `store` is None in a world of one."""
    if store is None:
        found = choose_checkpoint(resume, run_dir)
        return found and found[:2]
    found = None
    if rank == 0:
        try:
            found = choose_checkpoint(resume, run_dir)
            decision = {"path": None} if found is None else \
                {"path": str(found[0]), "step": found[1]["progress"]["global_step"], "sha256": found[2]}
        except CheckpointError as e:
            decision = {"error": str(e)}  # the others stop with the same line
        store.set(KEY, json.dumps(decision))
    decision = json.loads(store.get(KEY))  # waits for rank 0
    if "error" in decision:
        raise CheckpointError(decision["error"])
    problem = ""
    if rank != 0 and decision["path"] is not None:
        problem, found = _load_chosen(decision)
    store.set(f"{KEY}/rank{rank}", problem)
    # Every rank waits for every report, so that all of them stop, with the same line, if one cannot resume.
    for r in range(world_size):
        report = store.get(f"{KEY}/rank{r}").decode()
        if report:
            raise CheckpointError(f"resume: rank {r} cannot use {decision['path']}, the checkpoint rank 0 chose: "
                                  f"{report}. The run folder (--out) must be on a filesystem that every node "
                                  "shares, with the same path")
    if found is not None:
        print(f"resume: rank {rank} loads {found[0]} (step {decision['step']}, sha256 {decision['sha256'][:12]})",
              file=sys.stderr, flush=True)
    return found and found[:2]


def _load_chosen(decision: dict) -> tuple[str, tuple | None]:
    """('', (path, state, sha256)) if this rank reads the same bytes rank 0 chose, else (what is wrong, None)."""
    path = Path(decision["path"])
    try:
        state, digest = read_checkpoint_and_digest(path)
    except CheckpointError as e:
        return str(e), None
    if digest != decision["sha256"] or state["progress"]["global_step"] != decision["step"]:
        return (f"{path} holds other bytes here (step {state['progress']['global_step']}) than on rank 0 "
                f"(step {decision['step']})"), None
    return "", (path, state, digest)

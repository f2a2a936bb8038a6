"""Reading last.pt while a run trains is race-free: a trainer that writes a checkpoint every step (and prunes the
old ones) and a reader in a loop; every read verifies and loads one consistent file. The old code hashed
last.pt, then looked up the sidecar of whatever last.pt pointed to by then, and failed with a false "sha256 does
not match" whenever the trainer re-pointed it in between."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from prepare_helpers import shard_mars

from stenvan.checkpoint import CheckpointError, read_checkpoint_and_digest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "baseline", "--pretrained", "none", "--clip_len", "2", "--height", "32", "--width", "16",
        "--ids_per_batch", "2", "--tracklets_per_id", "2", "--batches_per_epoch", "4", "--workers", "0",
        "--loader", "torch", "--device", "cpu", "--log_every", "1"]


def inode(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def test_reading_last_pt_while_a_trainer_writes_every_step(mars_tree, tmp_path):
    shards, run = tmp_path / "shards", tmp_path / "run"
    shard_mars(mars_tree, shards)
    steps = 8
    trainer = subprocess.Popen([sys.executable, "train.py", "--data", str(shards), "--out", str(run), *TINY,
                                "--ckpt_every", "1", "--keep_ckpts", "1", "--max_steps", str(steps)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    reads, raced, errors = 0, 0, []
    try:
        deadline = time.monotonic() + 600
        while trainer.poll() is None and time.monotonic() < deadline:
            before = inode(run / "last.pt")
            if before is None:
                time.sleep(0.05)
                continue
            try:
                state, digest, verified = read_checkpoint_and_digest(run / "last.pt")
            except CheckpointError as e:
                errors.append(str(e))
                continue
            reads += 1
            raced += inode(run / "last.pt") != before  # the trainer re-pointed last.pt during this read
            assert verified, "every checkpoint the trainer wrote has its .sha256"
            assert 1 <= state["progress"]["global_step"] <= steps
    finally:
        if trainer.poll() is None:
            trainer.kill()
        stderr = trainer.communicate()[1]
    assert trainer.returncode == 0, stderr[-2000:]
    assert errors == [], f"{len(errors)} of {reads + len(errors)} reads failed, e.g. {errors[0]}"
    assert raced >= 3, f"only {raced} of {reads} reads overlapped a re-pointed last.pt: the race was not exercised"

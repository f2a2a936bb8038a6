"""Helpers shared by the prepare tests: run the CLI, block a writer mid-shard, wait on a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from prepare.cli import main as prepare_main

REPO = Path(__file__).resolve().parents[1]


def run_prepare(*args) -> int:
    return prepare_main([str(a) for a in args])


def shard_mars(tree, out, *extra):
    assert run_prepare("mars", "--data-dir", tree, "--info-dir", tree / "info", "--out", out, "--workers", 1,
                       *extra) == 0
    return json.loads((Path(out) / "manifest.json").read_text())


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_for(condition, proc, seconds=60):
    """Poll `condition` while `proc` runs; on a timeout kill it and its workers (a process blocked on a FIFO
    never ends, and a worker that outlives it keeps its output pipes open)."""
    deadline = time.time() + seconds
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            for pid in children(proc.pid) + [proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                said = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                said = "(its output pipes stayed open)"
            raise AssertionError(f"gave up waiting; prepare said: {said}")
        time.sleep(0.05)


BLOCK = "STENVAN_TEST_BLOCK_FRAME"  # "<frame path>|<fifo path>": reading that frame waits on the FIFO
PREPARE_MAIN = f"""
import os, sys
from prepare import cli, writer

victim, _, fifo = os.environ.get("{BLOCK}", "").partition("|")
real = writer.read_frame_file

def read_frame_file(path, size):  # the frame's read never returns: nobody writes into the FIFO
    if victim and os.path.abspath(path) == victim:
        with open(fifo, "rb") as f:
            f.read()
    return real(path, size)

writer.read_frame_file = read_frame_file  # the pool forks: its workers read through this too
sys.exit(cli.main(sys.argv[1:]))
"""


def prepare_argv(*args) -> list[str]:
    """`python -m prepare ARGS` as a subprocess command; after `block_on_fifo`, its writer blocks mid-shard."""
    return [sys.executable, "-c", PREPARE_MAIN, *map(str, args)]


def block_on_fifo(tree, index=-1):
    """Make a `prepare_argv` process block while it reads a train frame (default: of the last train identity),
    mid-shard, after the earlier shards are finished: the read waits on a FIFO of the test's own (a FIFO in the
    dataset itself is refused: only regular files are frames). Returns a function that lifts the block for
    later runs."""
    names = (Path(tree) / "info" / "train_name.txt").read_text().split()
    victim = Path(tree) / "bbox_train" / names[index][:4] / names[index]
    fifo = Path(tree).parent / f".block-{uuid.uuid4().hex[:8]}.fifo"
    os.mkfifo(fifo)
    os.environ[BLOCK] = f"{os.path.abspath(victim)}|{fifo}"

    def restore():
        os.environ.pop(BLOCK, None)
        fifo.unlink(missing_ok=True)
    return restore


def snapshot(folder) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (dot-files included): relative path → (bytes, mtime_ns)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.startswith("prepare: error:")]

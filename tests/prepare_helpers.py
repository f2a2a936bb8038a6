"""Helpers shared by the prepare tests: run the CLI, block a writer on a FIFO, wait on a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
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


def block_on_fifo(tree, index=-1):
    """Replace a train frame (default: of the last train identity) by a FIFO: a writer reading it blocks
    mid-shard, after the earlier shards are finished. Returns a function that puts the frame back."""
    names = (Path(tree) / "info" / "train_name.txt").read_text().split()
    victim = Path(tree) / "bbox_train" / names[index][:4] / names[index]
    original, stat = victim.read_bytes(), victim.stat()
    victim.unlink()
    os.mkfifo(victim)

    def restore():
        victim.unlink()
        victim.write_bytes(original)
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return restore


def snapshot(folder) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (dot-files included): relative path → (bytes, mtime_ns)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.startswith("prepare: error:")]

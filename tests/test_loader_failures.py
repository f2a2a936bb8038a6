"""Failures under a running job: a shard truncated, overwritten, replaced or deleted while the loaders iterate ends
in one clear ShardChangedError naming the shard (no SIGBUS, no DALI traceback), and the loaders' worker processes
die with a trainer killed by SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prepare.cli import main as prepare_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(mars_tree, module_tmp):
    out = module_tmp("failure_shards") / "mars"
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(out), "--workers", "1"]) == 0
    return out


# Runs in a child process: a SIGBUS (what memory-mapped shards gave) kills the child, not the test session.
# For each change: copy the shards, load a batch, change the shard being read, iterate on; one JSON line each.
MUTATE = r"""
import json, os, shutil, sys
from pathlib import Path
from stenvan.data import build_eval_loader, build_train_loader

src, work, backend = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def change(shard, how):
    if how == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif how == "overwrite":  # in place, same size: only the bytes differ
        data = shard.read_bytes()
        with open(shard, "r+b") as f:
            f.write(data[len(data) // 2:] + data[:len(data) // 2])
    elif how == "replace":  # another file renamed over it (what a rewriting tool does)
        tmp = shard.with_suffix(".new")
        tmp.write_bytes(shard.read_bytes()[:-1024])
        os.replace(tmp, shard)
    elif how == "delete":
        shard.unlink()

CASES = [(how, "train") for how in ("truncate", "overwrite", "replace", "delete")] + \
    [("truncate", "eval"), ("delete", "eval")]
for how, kind in CASES:
    d = work / f"{how}-{kind}"
    shutil.copytree(src, d)
    split, shard = ("train", d / "train-00000.tar") if kind == "train" else ("gallery", d / "test-00000.tar")
    size = dict(clip_len=4, height=64, width=32, workers=1, backend=backend)
    if kind == "train":
        loader = build_train_loader(d, P=4, K=2, seed=0, batches_per_epoch=30, **size)
        batches = loader.epoch(0)
    else:
        loader = build_eval_loader(d, split, mode="dense", batch_size=2, **size)
        batches = iter(loader)
    with loader:
        next(batches)
        change(shard, how)
        seen, outcome = 1, {"how": how, "kind": kind, "shard": str(shard.resolve())}
        try:
            for _ in batches:
                seen += 1
            outcome["error"] = None
        except Exception as e:
            outcome.update(error=type(e).__name__, message=str(e))
        outcome["batches"] = seen
    print(json.dumps(outcome), flush=True)
"""


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_shard_changed_under_the_loaders_ends_in_one_clear_error(shards, tmp_path, backend):
    result = subprocess.run([sys.executable, "-c", MUTATE, str(shards), str(tmp_path), backend], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # a SIGBUS gives -7
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(outcomes) == 6, result.stdout + result.stderr[-3000:]
    for o in outcomes:
        assert o["error"] == "ShardChangedError", o
        assert o["message"].startswith(o["shard"] + ": ") and "\n" not in o["message"], o
        assert "rerun prepare" in o["message"], o
        assert o["batches"] < 8, o  # promptly: within the few batches the loader had read ahead


def _children(pid: int) -> list[int]:
    """Every descendant process of `pid` (from /proc)."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parent_of.items() if parent in frontier]
        out += frontier
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (here: init) has not reaped it yet


def assert_die_with(proc: subprocess.Popen, workers: list[int]) -> None:
    """SIGKILL `proc` (no clean-up runs: what the OOM killer does); its `workers` must be gone within seconds."""
    try:
        assert len(workers) >= 2, workers  # the loader's two worker processes (not vacuous)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 3  # a DataLoader worker's own watchdog needs 5-10 s; DALI's never fires
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if _alive(p)], "loader workers outlived the killed process"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in workers:  # the processes this test started, if they outlived their parent
            if _alive(p):
                os.kill(p, signal.SIGKILL)


PREPARED = r"""
import sys, time, torch
from stenvan.data import build_train_loader, dali_loader
loader = build_train_loader(sys.argv[1], P=4, K=2, clip_len=4, height=64, width=32, workers=2, seed=0,
                            batches_per_epoch=5)
if sys.argv[2] == "fork":
    loader.prepare(0)  # workers started, not a batch asked for yet
else:
    source = dali_loader.TrainSource(loader.table, loader.plan, 4, 64, 32, first_epoch=0, first_step=0)
    pipe = dali_loader.build_pipeline(source, batch_size=8, height=64, width=32, device=torch.device("cpu"),
                                      workers=2, half=False, start_method="spawn")
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dali_workers_die_with_their_process_before_the_first_batch(shards, start_method):
    """The trainer builds the pipeline (its workers start) long before its first step: no window of orphans."""
    proc = subprocess.Popen([sys.executable, "-c", PREPARED, str(shards), start_method], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = _children(proc.pid)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert_die_with(proc, workers)


# A tiny STE-NVAN that would train for a long time (tests/test_train.py's TINY configuration).
TINY = ["--arch", "ste_nvan", "--pretrained", "none", "--clip_len", "4", "--height", "32", "--width", "16",
        "--stripes", "2", "--ids_per_batch", "2", "--tracklets_per_id", "2", "--batches_per_epoch", "4",
        "--epochs", "100000", "--lr", "1e-3", "--log_every", "1"]


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_loader_workers_die_with_a_killed_trainer(shards, tmp_path, loader):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--data", str(shards), "--out", str(out), *TINY, "--loader", loader,
           "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.1)
        workers = _children(proc.pid)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert_die_with(proc, workers)


# Runs in a child process: builds a loader whose workers start (DALI forked or spawned, or torch's DataLoader),
# says "ready", waits until the test has signalled the workers, loads a batch, then ends its workers with SIGTERM
# itself (as DALI's pool and the DataLoader do when they stop them) and says which of them are gone.
SIGNALLED = r"""
import os, signal, sys, time, torch
from pathlib import Path
from stenvan.data import build_train_loader, dali_loader

def children():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid()]

shards, how = sys.argv[1], sys.argv[2]
loader = build_train_loader(shards, P=4, K=2, clip_len=4, height=64, width=32, workers=2, seed=0, batches_per_epoch=5,
                            backend="torch" if how == "torch" else "dali")
if how == "spawn":
    source = dali_loader.TrainSource(loader.table, loader.plan, 4, 64, 32, first_epoch=0, first_step=0)
    pipe = dali_loader.build_pipeline(source, batch_size=8, height=64, width=32, device=torch.device("cpu"),
                                      workers=2, half=False, start_method="spawn")
    batches = dali_loader.run_pipeline(pipe, source, torch.device("cpu"), torch.float32)
else:
    batches = loader.epoch(0)
    if how == "torch":
        next(batches)  # the DataLoader starts its workers with the first batch
    else:
        loader.prepare(0)
workers = children()
print("ready", " ".join(map(str, workers)), flush=True)
sys.stdin.readline()
next(batches)  # the workers still serve batches
print("batch", flush=True)
signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the DataLoader would raise for its workers ended here, not at exit
for pid in workers:
    os.kill(pid, signal.SIGTERM)
time.sleep(3)
print("gone", " ".join(str(p) for p in workers if not os.path.exists(f"/proc/{p}")
                       or Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("how", ["fork", "spawn", "torch"])
def test_loader_workers_ignore_stop_signals_meant_for_their_trainer(shards, how):
    """torchrun stops a rank with killpg, a terminal's Ctrl-C and SLURM signal every process: the loader's workers
    get the trainer's SIGTERM/SIGINT too. They must outlive it (the trainer finishes its step and saves, and DALI
    fails the next batch if a worker died: "Worker data receiving interrupted"), yet still stop when their own
    process stops them."""
    proc = subprocess.Popen([sys.executable, "-c", SIGNALLED, str(shards), how], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"], proc.stderr.read()[-3000:] if proc.poll() is not None else ready
        # The two loader workers (spawning also starts multiprocessing's resource tracker, not ours to shield).
        workers = [int(p) for p in ready[1:] if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2, ready
        for pid in workers:  # from another process than their parent, as torchrun's killpg
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
        time.sleep(1.5)
        assert all(_alive(p) for p in workers), "a loader worker died of a signal meant for its trainer"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "batch", proc.stderr.read()[-3000:]
        gone = proc.stdout.readline().split()
        assert gone[:1] == ["gone"] and {int(p) for p in gone[1:]} >= set(workers), gone  # their parent can stop them
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

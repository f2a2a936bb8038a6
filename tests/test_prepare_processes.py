"""prepare under concurrent runs, Ctrl-C and SIGKILL: one clear line, a lock per output folder, no orphans,
and a rerun that continues where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prepare.records import load_records
from prepare.writer import shard_intact
from prepare_helpers import (REPO, block_on_fifo, children, error_lines, prepare_argv, run_prepare, shard_mars,
                             wait_for)


def prepare_cmd(tree, out, workers=1):
    return prepare_argv("mars", "--data-dir", tree, "--out", out, "--workers", workers, "--shard-size", "200KB")


def sigint_as_in_a_terminal() -> None:
    """A program started from a terminal gets SIGINT's default action; the tests may not (a background job of a
    non-interactive shell inherits SIGINT ignored, and ignored stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_two_prepares_on_one_folder_the_second_is_refused(mars_tree, copy_tree, tmp_path, capsys):
    tree = copy_tree(mars_tree)
    restore = block_on_fifo(tree)
    out = tmp_path / "out"
    first = subprocess.Popen(prepare_cmd(tree, out, workers=2), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    wait_for(lambda: len(children(first.pid)) >= 2 and list(out.rglob("*.tar.json")), first)
    workers = children(first.pid)
    capsys.readouterr()
    code = run_prepare("mars", "--data-dir", mars_tree, "--out", out, "--workers", 1)
    errors = error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1, errors
    assert f"{out}: in use by prepare mars (pid {first.pid} on " in errors[0]

    # SIGKILL (the OOM killer): its workers die with it, and the next run takes over the stale lock.
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    orphans = [w for w in workers if alive(w)]
    for w in orphans:  # never leave them behind, even when the check below fails
        os.kill(w, signal.SIGKILL)
    assert not orphans, "prepare's workers outlived it"
    restore()
    capsys.readouterr()
    assert run_prepare("mars", "--data-dir", tree, "--out", out, "--workers", 1, "--shard-size", "200KB") == 0
    err = capsys.readouterr().err
    assert f"took over the stale lock of prepare mars (pid {first.pid} on" in err and "resuming" in err
    assert not (out / ".lock").exists()


def test_ctrl_c_stops_with_one_line_and_a_rerun_continues(mars_tree, copy_tree, tmp_path):
    reference = shard_mars(mars_tree, tmp_path / "ref", "--shard-size", "200KB")
    tree = copy_tree(mars_tree)
    restore = block_on_fifo(tree)
    out = tmp_path / "out"
    # Its own session: Ctrl-C in a terminal signals the whole process group, workers included.
    proc = subprocess.Popen(prepare_cmd(tree, out, workers=2), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)
    wait_for(lambda: len(children(proc.pid)) >= 2 and list(out.rglob("*.tar.json")), proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("prepare:")]
    assert lines == ["prepare: interrupted by SIGINT. Finished shards are kept: rerun the same command to continue "
                     "where it stopped."]
    assert not (out / ".lock").exists() and not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp"))
    # Finished shards: those whose record, tar and index are all in place (the run may stop between a record
    # and its shard's rename or index, as the record is written first: that shard is redone).
    kept = sum(shard_intact(record, str(out)) for record in load_records(out).values())
    restore()
    result = subprocess.run(prepare_cmd(tree, out), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"resuming, {kept} of {len(reference['shards'])} shards" in result.stderr
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()


def test_sigterm_stops_like_ctrl_c(mars_tree, copy_tree, tmp_path):
    tree = copy_tree(mars_tree)
    restore = block_on_fifo(tree)
    out = tmp_path / "out"
    proc = subprocess.Popen(prepare_cmd(tree, out, workers=1), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(out.rglob("*.tar.*.tmp")), proc)  # a shard being written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "prepare: interrupted by SIGTERM" in err
    assert not (out / ".lock").exists() and not list(out.rglob("*.tmp"))
    assert json.loads((out / ".prepare" / "run.json").read_text())["dataset"] == "mars"
    restore()


HELD_LOCK_RUN = """
import os, signal, sys, threading, time, types
from prepare import writer

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even where the tests ignore SIGINT

def hold_the_progress_lock(job, out_dir, skip_bad, *expect):
    writer._frames_done.get_lock().acquire()  # the pool's SIGTERM will land inside `with get_lock()`
    time.sleep(3600)

writer.write_shard = hold_the_progress_lock  # the pool forks: its workers run this
main = threading.main_thread().ident  # Ctrl-C while the run waits for its shards:
threading.Timer(3, signal.pthread_kill, (main, signal.SIGINT)).start()
try:
    writer.run_jobs([types.SimpleNamespace(name=f"s{i}.tar") for i in range(2)], sys.argv[1], False, 2, 10, 0)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_an_interrupted_run_does_not_hang_on_the_lock_of_a_killed_worker(tmp_path):
    """The pool's workers count frames under a shared lock; SIGTERM (how an interrupted run's pool ends them) can
    kill one inside it. The run must still stop: it read that count under the lock, and hung forever."""
    result = subprocess.run([sys.executable, "-c", HELD_LOCK_RUN, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "interrupted", result.stderr

"""train.py --split all|LIST: every person split trained and evaluated in turn, killed mid-split and resumed at that
split and step (the finished split is not redone; the resumed split ends as an uninterrupted run would), the mean ±
std summary; and the same under torchrun (2 processes, gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prepare.cli import main as prepare_main
from stenvan.checkpoint import read_checkpoint
from tests.video_trees import ilidsvid_tree

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "ste_nvan", "--pretrained", "none", "--clip_len", "4", "--height", "32", "--width", "16",
        "--stripes", "2", "--ids_per_batch", "2", "--tracklets_per_id", "2", "--batches_per_epoch", "2",
        "--epochs", "2", "--workers", "1", "--lr", "1e-3", "--log_every", "1", "--loader", "torch",
        "--ckpt_every", "2", "--keep_ckpts", "10", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # identical float reductions in the runs compared


@pytest.fixture(scope="module")
def shards(module_tmp):
    tmp = module_tmp("runner")
    out = tmp / "shards"
    assert prepare_main(["ilidsvid", "--data-dir", str(ilidsvid_tree(tmp / "raw")), "--out", str(out),
                         "--workers", "1"]) == 0
    return out


def runner(shards, out, *launcher):
    script = ["train.py"] if not launcher else [*launcher, "train.py"]
    return [sys.executable, *script, "--data", str(shards), "--out", str(out), "--split", "0,1", *TINY]


def test_killed_mid_split_resumes_there(shards, tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen(runner(shards, out), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    while not (out / "split-1" / "step-000000002.pt.sha256").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # in split 1's training, after its second step (of 4)
    proc.communicate()
    done = out / "split-0" / "eval-paper" / "metrics.json"
    first_metrics = done.read_bytes()
    assert not (out / "split-1" / "eval-paper").exists() and not (out / "splits.json").exists()

    result = subprocess.run(runner(shards, out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "split 0 is done" in result.stdout and done.read_bytes() == first_metrics  # not redone
    resumed = [line for line in result.stdout.splitlines() if line.startswith("resume: ")]
    assert any("split-1/step-" in line and "step 2" in line for line in resumed), result.stdout  # or later

    # the resumed split ends where an uninterrupted run of it ends
    alone = subprocess.run([sys.executable, "train.py", "--data", str(shards), "--out", str(tmp_path / "alone"),
                            "--split", "1", *TINY], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr
    ours, theirs = read_checkpoint(out / "split-1" / "last.pt"), read_checkpoint(tmp_path / "alone" / "last.pt")
    assert ours["progress"]["global_step"] == theirs["progress"]["global_step"] == 4
    for key in theirs["model"]:
        torch.testing.assert_close(ours["model"][key], theirs["model"][key], rtol=0, atol=0, msg=key)

    summary = json.loads((out / "splits.json").read_text())
    per_split = [json.loads((out / f"split-{s}" / "eval-paper" / "metrics.json").read_text()) for s in (0, 1)]
    assert summary["splits"] == [0, 1] and summary["dataset"] == "ilidsvid"
    for metric in ("rank1", "rank5", "mAP"):
        values = [m["cross_camera"][metric] for m in per_split]
        assert summary["mean"]["cross_camera"][metric] == pytest.approx(np.mean(values))
        assert summary["std"]["cross_camera"][metric] == pytest.approx(np.std(values, ddof=1))
    assert "mean ± std over 2 person splits" in result.stdout and "cross_camera" in result.stdout


def test_under_torchrun_every_split_runs_on_two_processes(shards, tmp_path):
    out = tmp_path / "runs"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29500 + os.getpid() % 1000)]
    result = subprocess.run(runner(shards, out, *launcher), cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "splits.json").read_text())
    assert summary["splits"] == [0, 1]
    for split in (0, 1):
        state = read_checkpoint(out / f"split-{split}" / "last.pt")
        assert state["world_size"] == 2 and state["config"]["split"] == split
        assert state["progress"]["global_step"] == 4


def test_refuses_a_dataset_without_person_splits(mars_tree, tmp_path):
    out = tmp_path / "mars"
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(out), "--workers", "1"]) == 0
    result = subprocess.run([sys.executable, "train.py", "--data", str(out), "--out", str(tmp_path / "r"), "--split",
                             "all"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "MARS has no person splits" in result.stderr

"""A run folder belongs to one run: a second train.py on it stops with one line, a dead run's lock is taken over;
a resume refuses another dataset, optimizer or model/batch setting and applies a new lr; a checkpoint without its
.sha256 is unverified (resume passes it over, eval warns); what killed checkpoint writes left is cleaned, and only
that."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from prepare.cli import main as prepare_main
from stenvan import checkpoint
from stenvan.checkpoint import (CheckpointError, newest_valid_checkpoint, read_checkpoint, save_checkpoint,
                                step_checkpoints)
from stenvan.config import load_config
from tests.test_train import REPO, TINY, run, shards, train_cmd  # noqa: F401 - the module's shard fixture
from tests.tiny_checkpoint import tiny_checkpoint


@pytest.fixture(scope="module")
def base_run(shards, module_tmp):  # noqa: F811
    """A finished 2-step run with a checkpoint after each step (copy it with `linked_copy` before using it)."""
    out = module_tmp("base") / "run"
    result = run(train_cmd(shards, out, "--max_steps", "2", "--ckpt_every", "1"))
    assert result.returncode == 0, result.stderr
    return out


def linked_copy(src, dst):
    """A copy of a run folder whose files are hard links (a resumed run only adds and removes files)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def wait_for_log_line(out, proc, lines=1):
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= lines):
        assert proc.poll() is None and time.time() < deadline, "the run ended too early"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------------
# Point 3: one run per run folder
# ----------------------------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_stops_with_one_line_and_a_dead_runs_lock_is_taken_over(
        shards, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(train_cmd(shards, out, "--epochs", "1000", "--ckpt_minutes", "0"), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for_log_line(out, first)
        held = json.loads((out / ".lock").read_text())
        assert held["pid"] == first.pid and held["what"] == "train.py" and held["host"] == socket.gethostname()
        second = run(train_cmd(shards, out, "--max_steps", "1", "--resume", "auto"))
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if line.startswith("train: error:")]
        assert len(errors) == 1 and errors[0].startswith(
            f"train: error: {out}: in use by train.py (pid {first.pid} on {socket.gethostname()}, since "), errors
        assert not list(out.glob("step-*")), "the second run wrote into the first run's folder"
    finally:
        first.send_signal(signal.SIGKILL)  # as the OOM killer would: its lock stays behind
        first.wait()
    third = run(train_cmd(shards, out, "--max_steps", "1", "--resume", "auto"))
    assert third.returncode == 0, third.stderr
    assert f"{out / '.lock'}: took over the stale lock of train.py (pid {first.pid} on " in third.stdout
    assert not (out / ".lock").exists()  # released at the end of the run
    # A fresh start (no --resume) over the checkpoints of that run would mix two runs' step files: refused.
    fresh = run(train_cmd(shards, out, "--max_steps", "1"))
    assert fresh.returncode == 2 and (f"train: error: {out}: holds the checkpoints of an earlier run (newest: "
                                      "step-000000001.pt); continue it with --resume auto") in fresh.stderr
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 1


# ----------------------------------------------------------------------------------------------------------
# Point 4: what a resume must keep, and what it may change
# ----------------------------------------------------------------------------------------------------------

def resume_trainer(shards, out, *extra, data=None):  # noqa: F811
    from stenvan.training.trainer import Trainer

    return Trainer(load_config(None, TINY + list(extra), data=str(data or shards), out=str(out)), resume="auto")


@pytest.fixture(scope="module")
def other_dataset(module_tmp):
    """Another prepared dataset with as many training identities (4) as the tests' one: other tracklets."""
    from prepare.synthetic import generate

    root = module_tmp("other")
    generate("mars", root / "MARS", num_ids=8, seed=7, min_len=2, max_len=30)
    assert prepare_main(["mars", "--data-dir", str(root / "MARS"), "--out", str(root / "shards"),
                         "--workers", "1"]) == 0
    return root / "shards"


@pytest.mark.parametrize("change, message", [
    (["--optimizer", "sgd"], "optimizer adam → sgd (the optimizer state in the checkpoint)"),
    (["--clip_len", "8"], "clip_len 4 → 8 (the clips the model was trained on)"),
    (["--ids_per_batch", "4"], "ids_per_batch 2 → 4 (the batch, the sampler's position and the steps of an epoch)"),
    (["--stem_relu", "true"], "stem_relu False → True (the model's function"),
    ("other dataset", "dataset "),
])
def test_resume_refuses_another_dataset_optimizer_or_model_with_one_line(
        shards, base_run, other_dataset, tmp_path, change, message):  # noqa: F811
    out = linked_copy(base_run, tmp_path / "run")
    data = other_dataset if change == "other dataset" else None
    with pytest.raises(CheckpointError) as e:
        resume_trainer(shards, out, *([] if data else change), data=data).close()
    line = str(e.value)
    assert line.startswith(f"{out / 'step-000000002.pt'}: a resumed run must keep what its checkpoint was trained "
                           "with, but this run changes ") and message in line and "\n" not in line
    assert line.endswith("start a new run in another --out")
    if data:
        assert f"{other_dataset} holds other data than the run was trained on" in line
    assert not (out / ".lock").exists()  # the refused run released the folder


def test_resume_from_a_moved_copy_of_the_same_dataset_and_with_a_new_lr(
        shards, base_run, tmp_path, capsys):  # noqa: F811
    out = linked_copy(base_run, tmp_path / "run")
    moved = shutil.copytree(shards, tmp_path / "elsewhere" / "shards")  # the same data at another path: allowed
    trainer = resume_trainer(shards, out, "--lr", "5e-4", "--weight_decay", "1e-4", "--max_steps", "3", data=moved)
    try:
        # The checkpoint's optimizer carried lr 1e-3 and weight decay 5e-5; the new values take effect.
        groups = trainer.optimizer.param_groups
        assert [g["lr"] for g in groups] == [5e-4] and [g["weight_decay"] for g in groups] == [1e-4]
        assert trainer.scheduler.base_lrs == [5e-4] and trainer.progress.global_step == 2
        out_text = capsys.readouterr().out
        assert "config changes: " in out_text and "lr 0.001 → 0.0005 (applied)" in out_text
        assert f"data {shards} → {moved}" in out_text and "weight_decay 5e-05 → 0.0001 (applied)" in out_text
        trainer.fit()
    finally:
        trainer.close()
    saved = read_checkpoint(out / "last.pt")
    assert saved["progress"]["global_step"] == 3 and saved["optimizer"]["param_groups"][0]["lr"] == 5e-4


def test_resume_into_fp16_starts_a_fresh_grad_scaler(shards, base_run, tmp_path, monkeypatch):  # noqa: F811
    # fp16 needs a GPU; on the CPU the trainer is told it resolved to fp16 (an enabled GradScaler, as on a V100).
    import stenvan.training.trainer

    monkeypatch.setattr(stenvan.training.trainer, "resolve_precision", lambda precision, device: "fp16")
    out = linked_copy(base_run, tmp_path / "run")
    trainer = resume_trainer(shards, out)  # the fp32 run's scaler state is empty: loading it raised before
    try:
        assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**16
    finally:
        trainer.close()


# ----------------------------------------------------------------------------------------------------------
# Point 6: a checkpoint without its .sha256 is unverified
# ----------------------------------------------------------------------------------------------------------

def state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "progress": {"global_step": step}, "config": {}}


class Killed(BaseException):
    """Stands for a SIGKILL at that point of the writer (the process would be gone)."""


def test_resume_passes_over_a_newer_checkpoint_whose_sidecar_was_never_written(tmp_path, capsys, monkeypatch):
    for step in (1, 2):
        save_checkpoint(state(step), tmp_path, step, keep=5)

    def killed(path, data):
        raise Killed()

    monkeypatch.setattr(checkpoint, "atomic_write", killed)  # killed after the rename, before the sidecar
    with pytest.raises(Killed):
        save_checkpoint(state(3), tmp_path, 3, keep=5)
    monkeypatch.undo()
    newest = tmp_path / "step-000000003.pt"
    assert newest.exists() and not (tmp_path / "step-000000003.pt.sha256").exists()
    assert read_checkpoint(tmp_path / "last.pt")["progress"]["global_step"] == 2  # last.pt: still the verified one
    capsys.readouterr()
    path, loaded = newest_valid_checkpoint(tmp_path)
    assert path.name == "step-000000002.pt" and loaded["progress"]["global_step"] == 2
    err = capsys.readouterr().err
    assert (f"resume: skipping {newest}: unverified: no step-000000003.pt.sha256 beside it to check its bytes "
            "against") in err and "(renamed to step-000000003.pt.unverified)" in err
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-000000001.pt", "step-000000002.pt"]


def test_with_no_verified_checkpoint_the_newest_unverified_one_is_used_with_a_warning(tmp_path, capsys):
    for step in (1, 2):
        save_checkpoint(state(step), tmp_path, step, keep=5)
        (tmp_path / f"step-{step:09d}.pt.sha256").unlink()  # e.g. step files copied without their sidecars
    path, loaded = newest_valid_checkpoint(tmp_path)
    assert path.name == "step-000000002.pt" and loaded["progress"]["global_step"] == 2
    assert f"resume: warning: no checkpoint in {tmp_path} verifies; continuing from {path}: unverified" in \
        capsys.readouterr().err
    read_checkpoint(path)  # an explicit load warns too, in one line
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {path}: unverified: no step-000000002.pt.sha256")


def test_last_pt_of_a_checkpoint_set_aside_as_damaged_is_refused(tmp_path):
    for step in (1, 2):
        save_checkpoint(state(step), tmp_path, step, keep=5)
    newest = tmp_path / "step-000000002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # also last.pt's bytes: the same file
    newest.write_bytes(bytes(data))
    assert newest_valid_checkpoint(tmp_path)[0].name == "step-000000001.pt"  # sets step 2 aside as .bad
    with pytest.raises(CheckpointError, match="is the same file as step-000000002.pt.bad, which resume set aside"):
        read_checkpoint(tmp_path / "last.pt")


def test_a_copied_last_pt_verifies_against_its_step_files_sidecar(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(state(step), run_dir, step, keep=5)
    copy = shutil.copytree(run_dir, tmp_path / "copy")  # cp -r: last.pt is no longer a link to step 2
    assert not os.path.samefile(copy / "last.pt", copy / "step-000000002.pt")
    assert read_checkpoint(copy / "last.pt")["progress"]["global_step"] == 2
    assert capsys.readouterr().err == ""  # verified: no warning
    data = bytearray((copy / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "last.pt").write_bytes(bytes(data))
    read_checkpoint(copy / "last.pt")  # no longer equal to any recorded checkpoint: unverified (and said so)
    assert "unverified" in capsys.readouterr().err


def test_eval_of_a_checkpoint_without_its_sidecar_warns_in_one_line(shards, tmp_path):  # noqa: F811
    path = tiny_checkpoint(tmp_path / "model.pt")
    (tmp_path / "model.pt.sha256").unlink()
    result = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(path), "--data", str(shards), "--loader",
                             "torch", "--workers", "0", "--out", str(tmp_path / "eval")], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {path}: unverified: no model.pt.sha256 beside it to check its bytes against (a copy "
                        "made without it, or a write cut short), so a damaged file would load with wrong weights"]
    assert (tmp_path / "eval" / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------------------
# Point 10: what killed checkpoint writes left behind is cleaned, and only that
# ----------------------------------------------------------------------------------------------------------

# Writes a checkpoint into argv[1] and SIGKILLs itself in the middle: of the data ("data") or of last.pt's link.
KILL_WRITE = r"""
import os, signal, sys, torch
from stenvan import checkpoint
run_dir, where = sys.argv[1], sys.argv[2]
if where == "data":
    real_write = checkpoint._HashingFile.write
    def write(self, data):
        real_write(self, data)
        if self.f.tell() > 1 << 20:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._HashingFile.write = write
else:
    real_replace = os.replace
    def replace(src, dst):
        if os.path.basename(src).startswith(".last.pt."):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
checkpoint.save_checkpoint({"model": {"w": torch.zeros(1 << 20)}}, run_dir, 9, keep=5)
"""


def kill_a_write(run_dir, where) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_WRITE, str(run_dir), where], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_resume_removes_only_the_temp_files_of_killed_checkpoint_writes(shards, base_run, tmp_path):  # noqa: F811
    out = linked_copy(base_run, tmp_path / "run")
    kill_a_write(out, "data")  # a killed write of step 9's data: a temp file of its size so far
    scratch = tmp_path / "scratch"
    kill_a_write(scratch, "link")  # killed while pointing last.pt at the new step file
    for leftover in scratch.glob(".last.pt.*.tmp"):
        os.replace(leftover, out / leftover.name)
    ours = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    assert len(ours) == 2 and ours[0].startswith(".last.pt.") and ours[1].startswith(".step-000000009.pt.")
    others = [".lock.123.abcd1234.tmp", ".step-000000009.pt.tmp", "notes.tmp", "step-000000001.pt.bad",
              ".config.yaml.tmp"]
    for name in others:  # not names our checkpoint writer makes: never touched
        (out / name).write_text("not ours")
    result = run(train_cmd(shards, out, "--max_steps", "3", "--resume", "auto"))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "removed what killed checkpoint writes left" in line)
    assert all(name in line for name in ours) and "MiB)" in line
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == sorted(
        n for n in others if n.endswith(".tmp"))
    assert all((out / name).read_text() == "not ours" for name in others)
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 3


def test_a_fresh_start_removes_them_too(shards, tmp_path, capsys):  # noqa: F811
    from stenvan.training.trainer import Trainer

    out = tmp_path / "run"
    kill_a_write(out, "data")
    leftover = next(out.glob(".step-000000009.pt.*.tmp"))
    trainer = Trainer(load_config(None, TINY, data=str(shards), out=str(out)))
    trainer.close()
    assert not leftover.exists() and f"removed what killed checkpoint writes left: {leftover.name}" in \
        capsys.readouterr().out


def test_ranks_on_nodes_with_other_data_at_the_same_path_stop_before_training(
        shards, other_dataset, tmp_path):  # noqa: F811
    # Two "nodes", each with its own copy of --data at the same relative path: node 1's holds another dataset.
    from tests.test_distributed import free_port

    for node, data in (("node0", shards), ("node1", other_dataset)):
        shutil.copytree(data, tmp_path / node / "shards")
    wrapper = tmp_path / "in_node_folder.sh"
    train = REPO / "train.py"
    wrapper.write_text(f'#!/bin/sh\ncd "{tmp_path}/node$LOCAL_RANK" && exec {sys.executable} {train} "$@"\n')
    wrapper.chmod(0o755)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "--no-python", str(wrapper), "--data", "shards", "--out", str(tmp_path / "run"), *TINY, "--max_steps", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    line = ("train: error: rank 1: shards holds another dataset than rank 0's (fingerprint ")
    assert result.stderr.count(line) == 2, result.stderr[-3000:]  # both ranks stop, with the same line
    assert not list((tmp_path / "run").glob("step-*"))

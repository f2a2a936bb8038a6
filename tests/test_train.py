"""train.py never loses a run: resume after SIGKILL equals an uninterrupted run, SIGTERM saves, 1 process
equals 2 (gloo) with the same global batch, bf16 runs on the CPU, bad configs and checkpoints are clear."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prepare.cli import main as prepare_main
from stenvan.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
# A tiny STE-NVAN: 4-frame clips of 32x16, 2 stripes, 2 ids x 2 tracklets per batch, 4 steps per epoch.
TINY = ["--arch", "ste_nvan", "--pretrained", "none", "--clip_len", "4", "--height", "32", "--width", "16",
        "--stripes", "2", "--ids_per_batch", "2", "--tracklets_per_id", "2", "--batches_per_epoch", "4",
        "--epochs", "3", "--workers", "1", "--lr", "1e-3", "--log_every", "1", "--loader", "torch"]


@pytest.fixture(scope="module")
def shards(mars_tree, module_tmp):
    out = module_tmp("train") / "shards"
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(out), "--workers", "1"]) == 0
    return out


def train_cmd(shards, out, *extra):
    return [sys.executable, "train.py", "--data", str(shards), "--out", str(out), *TINY, *extra]


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # identical float reductions in every run being compared
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env, **kw)


def model_of(path):
    return read_checkpoint(path)["model"]


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=f"parameter {k} differs")


@pytest.fixture(scope="module")
def reference(shards, module_tmp):
    """An uninterrupted 7-step run, checkpointing every step."""
    out = module_tmp("reference") / "run"
    result = run(train_cmd(shards, out, *SEVEN_STEPS))
    assert result.returncode == 0, result.stderr
    return out


SEVEN_STEPS = ["--max_steps", "7", "--ckpt_every", "1", "--keep_ckpts", "10"]


def wait_for_checkpoint(out, step, proc):
    deadline = time.time() + 300
    while not (out / f"step-{step:09d}.pt.sha256").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)


def test_resume_after_sigkill_equals_uninterrupted_run(shards, reference, tmp_path):
    final = model_of(reference / "last.pt")
    with pytest.raises(AssertionError):  # not vacuous: one step less gives other parameters
        assert_same(model_of(reference / "step-000000006.pt"), final)

    kill_after = random.Random().randint(2, 5)  # a random step, a different one on each run of the suite
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(shards, out, *SEVEN_STEPS), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    wait_for_checkpoint(out, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "step-000000007.pt").exists()
    # The newest checkpoint is damaged too (as by a crash mid-write on a bad disk): resume must skip it.
    newest = sorted(out.glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = run(train_cmd(shards, out, *SEVEN_STEPS, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping" in resumed.stderr and newest.name in resumed.stderr
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 7
    assert_same(model_of(out / "last.pt"), final)


def test_torchrun_max_restarts_resumes_a_killed_worker(shards, reference, tmp_path):
    out = tmp_path / "restarted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--max-restarts=1", "--master_port",
           str(30500 + random.Random().randint(0, 999)), *train_cmd(shards, out, *SEVEN_STEPS, "--resume", "auto")[1:]]
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_checkpoint(out, 3, agent)
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == agent.pid]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)  # the worker dies; torchrun starts it again with the same arguments
    stdout, stderr = agent.communicate(timeout=300)
    assert agent.returncode == 0, stderr[-2000:]
    assert "resume:" in stdout + stderr
    # The restarted rank 0 takes the run folder's lock over from its killed predecessor (the same host).
    assert f"took over the stale lock of train.py (pid {workers[0]} on" in stdout + stderr
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 7
    assert_same(model_of(out / "last.pt"), model_of(reference / "last.pt"))


def _parent(pid: int) -> int | None:
    """The parent pid of a process (the torchrun agent's children are its workers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_sigterm_saves_a_loadable_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shards, out, "--epochs", "50", "--ckpt_every", "0"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped cleanly" in stdout
    state = torch.load(out / "last.pt", weights_only=True)
    assert 2 <= state["progress"]["global_step"] < 50 * 4


def test_one_process_equals_two_processes(shards, tmp_path):
    # Holds when BatchNorm uses running statistics (freeze_bn): per-rank batch statistics would differ from the
    # global batch's. Then DDP's gradient all-reduce plus the global triplet mining give the 1-process gradient.
    # SGD with a small lr keeps float noise float-sized (Adam's first steps are ±lr whatever the gradient's size).
    # After step 1 (same weights, same batch) only float reduction order differs: 1e-4 of the update. Later steps
    # start from weights that already differ by that noise, and batch-hard mining may then flip between near-tied
    # candidates of this tiny untrained model, so step 3 gets 1e-2. A real error (a rank's gradient or a mining
    # half missing) changes the update by tens of percent.
    common = ["--max_steps", "3", "--freeze_bn", "true", "--ids_per_batch", "4", "--optimizer", "sgd", "--lr", "1e-4",
              "--ckpt_every", "1", "--keep_ckpts", "5"]
    one = run(train_cmd(shards, tmp_path / "one", *common))
    assert one.returncode == 0, one.stderr
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
               str(29500 + random.Random().randint(0, 999)), *train_cmd(shards, tmp_path / "two", *common)[1:]])
    assert two.returncode == 0, two.stderr
    assert read_checkpoint(tmp_path / "two" / "last.pt")["world_size"] == 2
    from stenvan.evaluation.evaluate import load_model_for_eval

    init = load_model_for_eval(str(tmp_path / "one" / "last.pt"), None, untrained=True)[0].state_dict()
    for step, tolerance in ((1, 1e-4), (3, 1e-2)):
        name = f"step-{step:09d}.pt"
        a, b = model_of(tmp_path / "one" / name), model_of(tmp_path / "two" / name)
        floats = [k for k in a if a[k].is_floating_point()]
        update = sum((a[k] - init[k]).double().norm() ** 2 for k in floats) ** 0.5
        differ = sum((a[k] - b[k]).double().norm() ** 2 for k in floats) ** 0.5
        assert update > 1e-4 * step  # training moved the weights
        assert differ < tolerance * update, \
            f"step {step}: 1 vs 2 processes differ by {differ / update:.2e} of the update"
    # the logged losses are global means, so they agree too
    logs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert abs(logs[0][0]["loss"] - logs[1][0]["loss"]) < 1e-4 * abs(logs[0][0]["loss"])
    for r1, r2 in zip(*logs):
        assert abs(r1["loss"] - r2["loss"]) < 1e-2 * abs(r1["loss"])


def test_bf16_autocast_runs_on_cpu_and_dali_loader(shards, tmp_path):
    result = run(train_cmd(shards, tmp_path / "bf16", "--max_steps", "2", "--precision", "bf16", "--loader", "dali"))
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert (tmp_path / "bf16" / "config.yaml").read_text().count("precision: bf16") == 1
    assert read_checkpoint(tmp_path / "bf16" / "last.pt")["config"]["precision"] == "bf16"


def test_nonfinite_losses_are_skipped_then_stop_the_run(shards, tmp_path, monkeypatch):
    from stenvan.config import load_config
    from stenvan.training.losses import ReIDLoss
    from stenvan.training.trainer import Trainer, TrainingStopped

    real = ReIDLoss.forward
    calls = {"n": 0}

    def poisoned(self, feats, logits, labels):
        out = real(self, feats, logits, labels)
        calls["n"] += 1
        if calls["n"] >= 2:  # first step fine, then NaN forever
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(ReIDLoss, "forward", poisoned)
    cfg = load_config(None, TINY + ["--max_nonfinite", "3"], data=str(shards), out=str(tmp_path / "nan"))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingStopped, match="3 steps in a row with non-finite losses or gradients"):
        trainer.fit()
    trainer.close()
    assert trainer.progress.nonfinite_total == 3 and trainer.progress.global_step == 4
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("nonfinite_loss", 0) for r in records) == 3
    assert all(torch.isfinite(v.float()).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_bad_configs_and_checkpoints_are_clear_errors(shards, tmp_path):
    bad = run(train_cmd(shards, tmp_path / "x", "--learning_rate", "1"))
    assert bad.returncode == 2 and "unknown config key 'learning_rate'" in bad.stderr
    bad = run(train_cmd(shards, tmp_path / "x", "--clip_len", "6"))
    assert bad.returncode == 2 and "multiple of 4" in bad.stderr
    bad = run(train_cmd(tmp_path / "nowhere", tmp_path / "x"))
    assert bad.returncode == 2 and "nowhere" in bad.stderr
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    bad = run(train_cmd(shards, tmp_path / "x", "--resume", str(tmp_path / "foreign.pth")))
    assert bad.returncode == 2 and "not a stenvan checkpoint" in bad.stderr
    ok = run(train_cmd(shards, tmp_path / "run", "--max_steps", "1"))
    assert ok.returncode == 0, ok.stderr
    bad = run(train_cmd(shards, tmp_path / "run", "--arch", "nvan", "--resume", "auto"))
    assert bad.returncode == 2 and "changes arch ste_nvan → nvan (the model)" in bad.stderr


def test_dali_pipeline_runs_across_epochs_without_rebuilds(shards, tmp_path, monkeypatch):
    from stenvan.config import load_config
    from stenvan.data import dali_loader
    from stenvan.training.trainer import Trainer

    builds = []
    real = dali_loader.build_pipeline
    monkeypatch.setattr(dali_loader, "build_pipeline", lambda *a, **k: builds.append(1) or real(*a, **k))
    cfg = load_config(None, TINY + ["--loader", "dali", "--epochs", "3", "--batches_per_epoch", "2"],
                      data=str(shards), out=str(tmp_path / "dali"))
    trainer = Trainer(cfg)
    assert len(builds) == 1  # built up front, before CUDA could be initialised
    progress = trainer.fit()
    trainer.close()
    assert progress.global_step == 6 and progress.epoch == 3
    assert len(builds) == 1  # one pipeline for the whole run


def test_periodic_evaluation_and_selection_only_when_asked(shards, tmp_path):
    from stenvan.config import load_config
    from stenvan.training.trainer import Trainer

    for select in (False, True):
        out = tmp_path / f"select-{select}"
        cfg = load_config(None, TINY + ["--epochs", "2", "--batches_per_epoch", "1", "--eval_every", "1",
                                        "--select_on_test", str(select).lower()], data=str(shards), out=str(out))
        trainer = Trainer(cfg)
        trainer.fit()
        trainer.close()
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if r["kind"] == "eval"]
        assert [r["step"] for r in evals] == [1, 2]
        assert all(0 <= r["standard_rank1"] <= 1 and 0 <= r["official_mAP"] <= 1 for r in evals)
        assert (out / "best.pt").exists() == select  # the test set picks a model only when asked
        if select:
            best = read_checkpoint(out / "best.pt")["progress"]["best_map"]
            assert best == max(r["standard_mAP"] for r in evals)
            assert read_checkpoint(out / "last.pt")["progress"]["best_map"] == best  # survives a resume

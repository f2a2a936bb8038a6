"""Training started by `torchrun` itself (2 ranks, gloo, the DALI loader), with its process groups, signals and
restarts: SIGTERM to torchrun stops every rank at the same step with exit 0 and one loadable checkpoint (the
ranks' agreement logged as its own share);
`--max-restarts=1` with a worker SIGKILLed mid-run continues from the checkpoint and ends equal to an uninterrupted
run; a resume with `channels_last` toggled equals the uninterrupted run; a resume on fewer ranks than the checkpoint
was written with works; several nodes that would restart on one shared store are refused in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stenvan.checkpoint import read_checkpoint
from tests.test_distributed import free_port
from tests.test_train import (REPO, _parent, assert_same, model_of, run, shards, train_cmd,  # noqa: F401 - fixture
                              wait_for_checkpoint)

SIX_STEPS = ["--loader", "dali", "--max_steps", "6", "--ckpt_every", "1", "--keep_ckpts", "10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # identical float reductions in every run being compared


def torchrun(*args: str, launcher: tuple = ()) -> list[str]:
    """The README's single-node command: `torchrun --nproc_per_node=2 [launcher options] train.py args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
            *launcher, "train.py", *args]


@pytest.fixture(scope="module")
def reference(shards, module_tmp):  # noqa: F811
    """An uninterrupted 2-rank run of 6 steps under torchrun, checkpointing every step."""
    out = module_tmp("torchrun_reference") / "run"
    result = run(torchrun(*train_cmd(shards, out, *SIX_STEPS)[2:]))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def workers_of(agent: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the torchrun agent's worker processes."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _parent(int(entry)) == agent.pid:
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(entry)
    return found


def finish(agent: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The agent's (stdout, stderr) once it exits; after `timeout` s (a hung run) the launch is killed and the
    test fails."""
    try:
        return agent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launch(agent)
        raise


def kill_launch(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent that is still running and its workers (each leads its own process group, with
    its loader's processes): nothing of a failed test keeps running."""
    if agent.poll() is not None:
        return
    for pid in workers_of(agent).values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.kill()
    agent.communicate()


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step_with_one_checkpoint(shards, tmp_path):  # noqa: F811
    # Each rank runs under a shell that writes the rank's exit code (torchrun reports only failures). The shell
    # defers its own SIGTERM until train.py has exited (a trap, which train.py does not inherit).
    wrapper = tmp_path / "record_exit.sh"
    wrapper.write_text(f"#!/bin/sh\ntrap 'true' INT TERM\n{sys.executable} {REPO / 'train.py'} \"$@\"\ncode=$?\n"
                       f"echo $code > {tmp_path}/exit-rank$RANK\nexit $code\n")
    wrapper.chmod(0o755)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "--no-python", str(wrapper), *train_cmd(shards, out, "--loader", "dali", "--epochs", "50")[2:]]
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training, DALI workers busy
            assert agent.poll() is None and time.time() < deadline, agent.communicate()[1][-3000:]
            time.sleep(0.05)
        agent.send_signal(signal.SIGTERM)  # what a scheduler's preemption or Ctrl-C on torchrun does
        stdout, stderr = finish(agent, 120)
    finally:
        kill_launch(agent)
    # torchrun stops its workers with killpg (the DALI workers get SIGTERM too), then exits 1 itself, by design.
    codes = {rank: (tmp_path / f"exit-rank{rank}").read_text().strip() for rank in (0, 1)}
    assert codes == {0: "0", 1: "0"}, stderr[-3000:]
    assert "Worker data receiving interrupted" not in stderr and not re.search(r"\[rank\d\]: Traceback", stderr)
    steps = {0: re.findall(r"stopped cleanly by signal 15 at step (\d+)", stdout),
             1: re.findall(r"train: rank 1 stopped cleanly by signal 15 at step (\d+)", stderr)}
    assert len(steps[0]) == len(steps[1]) == 1, stdout[-2000:] + stderr[-3000:]
    step = int(steps[0][0])
    assert steps[1] == steps[0]  # the same step on both ranks
    state = read_checkpoint(out / "last.pt")  # verified against its sidecar
    assert 2 <= state["progress"]["global_step"] == step < 50 * 4 and state["world_size"] == 2
    # The per-step agreement of the ranks is its own share of the time, not part of the data wait.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["agree_wait_share"] < 1 and 0 <= r["data_wait_share"] < 1 for r in records)
    assert "| rank agreement " in stdout


def test_max_restarts_continues_a_killed_worker_and_equals_an_uninterrupted_run(shards, reference,  # noqa: F811
                                                                                 tmp_path):
    out = tmp_path / "restarted"
    agent = subprocess.Popen(torchrun(*train_cmd(shards, out, *SIX_STEPS, "--resume", "auto")[2:],
                                      launcher=("--max-restarts=1",)),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_checkpoint(out, 3, agent)
        workers = workers_of(agent)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)  # a non-zero rank dies; torchrun restarts both with the same arguments
        stdout, stderr = finish(agent, 480)  # before, the restarted ranks hung (no failure, for ever)
    finally:
        kill_launch(agent)
    assert agent.returncode == 0, stderr[-3000:]
    # The restarted attempt's ranks both load rank 0's choice (not the first attempt's "no checkpoint" decision).
    loaded = re.findall(r"resume: rank (\d) loads \S+step-0+(\d)\.pt", stderr)
    assert sorted(rank for rank, _ in loaded) == ["0", "1"] and len({step for _, step in loaded}) == 1, stderr[-3000:]
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 6
    assert_same(model_of(out / "last.pt"), model_of(reference / "last.pt"))
    with pytest.raises(AssertionError):  # not vacuous: one step less gives other weights
        assert_same(model_of(reference / "step-000000005.pt"), model_of(reference / "last.pt"))


def resume_from_step_3(reference, out: Path) -> None:
    out.mkdir()
    for name in ("step-000000003.pt", "step-000000003.pt.sha256"):
        shutil.copy(reference / name, out / name)


def test_resume_with_channels_last_toggled_equals_the_uninterrupted_run(shards, reference, tmp_path):  # noqa: F811
    # The reference trained channels_last (the default); steps 4-6 here run with contiguous weights. The Adam
    # moments must follow the weights' layout: loaded with the checkpoint's strides, fused Adam updated every
    # convolution weight with other elements' moments (measured: differences of the size of a step).
    out = tmp_path / "toggled"
    resume_from_step_3(reference, out)
    result = run(torchrun(*train_cmd(shards, out, *SIX_STEPS, "--channels_last", "false", "--resume", "auto")[2:]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "channels_last True → False" in result.stdout
    toggled, final = model_of(out / "last.pt"), model_of(reference / "last.pt")
    before = model_of(reference / "step-000000005.pt")  # the size of one step
    step = sum((final[k] - before[k]).double().norm() ** 2 for k in final if final[k].is_floating_point()) ** 0.5
    differ = sum((final[k] - toggled[k]).double().norm() ** 2 for k in final if final[k].is_floating_point()) ** 0.5
    assert differ < 1e-3 * step, f"differs from the uninterrupted run by {differ / step:.2e} of a step"


def test_resume_on_fewer_ranks_than_the_checkpoint_was_written_with(shards, reference, tmp_path):  # noqa: F811
    out = tmp_path / "one"
    resume_from_step_3(reference, out)
    result = run(train_cmd(shards, out, *SIX_STEPS, "--resume", "auto"))  # one process, no torchrun
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume: {out / 'step-000000003.pt'} at epoch 0, step 3" in result.stdout
    state = read_checkpoint(out / "last.pt")
    assert state["progress"]["global_step"] == 6 and state["world_size"] == 1
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())


def test_several_nodes_that_would_restart_on_one_shared_store_are_refused_in_one_line(shards, tmp_path):  # noqa: F811
    # Two agents on this machine stand for two nodes; without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 every attempt
    # would share the first attempt's store, which several nodes cannot tell apart (stenvan.distributed).
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=1",
            *train_cmd(shards, tmp_path / "run", "--loader", "dali", "--max_steps", "1")[1:]]
    agents = [subprocess.Popen(node, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
              for _ in range(2)]
    try:
        outputs = [finish(agent, 300) for agent in agents]
    finally:
        for agent in agents:
            kill_launch(agent)
    assert all(agent.returncode != 0 for agent in agents)
    errors = [line for _, err in outputs for line in err.splitlines() if line.startswith("train: error:")]
    assert errors and all(line == errors[0] for line in errors), errors
    assert "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv-backend=c10d on every node" in errors[0]
    assert not (tmp_path / "run" / "last.pt").exists()

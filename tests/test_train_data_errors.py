"""A shard damaged under a running training job: every rank stops at the same step boundary with one line naming
the shard (exit 2), the checkpoint of that boundary is written, and once the shard is restored the run resumes
exactly as if it had never stopped. With 2 processes and only rank 1 reading the damaged frame, rank 0 does not
wait in a collective for it: both stop, with rank 1's line."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from stenvan.checkpoint import read_checkpoint, step_checkpoints
from stenvan.data import build_train_loader
from stenvan.shards import BLOCK
from tests.test_distributed import free_port
from tests.test_train import SEVEN_STEPS, assert_same, model_of, run, shards, train_cmd  # noqa: F401

FAILING_STEP = 3  # the damaged frame is first read by the batch of step 3: steps 0-2 complete, global step 3


def frames_read(shards, rank: int, world_size: int, step: int) -> set:  # noqa: F811
    """(shard id, offset, size, member) of every frame rank `rank` reads at global step `step` (TINY's sampler)."""
    loader = build_train_loader(shards, P=2, K=2, clip_len=4, height=32, width=16, seed=0, rank=rank,
                                world_size=world_size, backend="torch", batches_per_epoch=4)
    epoch, step_in_epoch = divmod(step, 4)
    return {loc for spec in loader.plan.batch(epoch, step_in_epoch)
            for loc in loader.table.frame_locations(spec.tracklet, spec.frames)}


def damage_a_frame_first_read_at(shards, step: int,  # noqa: F811
                                 only_rank: int | None = None) -> tuple[str, int, bytes]:
    """Overwrite in place the tar header of a frame that no rank reads before `step` (and, if given, only
    `only_rank` of 2 reads at `step`): what a rewriting tool does to a shard under a running job.
    Returns (the shard's path, the header's offset, the original header) to restore it."""
    world = 1 if only_rank is None else 2
    earlier = set().union(*(frames_read(shards, r, world, s) for r in range(world) for s in range(step)))
    candidates = frames_read(shards, only_rank or 0, world, step) - earlier
    if only_rank is not None:
        candidates -= frames_read(shards, 1 - only_rank, world, step)
    shard_id, offset, _, member = sorted(candidates)[0]
    path = str(sorted(shards.glob("train-*.tar"))[shard_id])
    with open(path, "r+b") as f:
        f.seek(offset - BLOCK)
        header = f.read(BLOCK)
        f.seek(offset - BLOCK)
        f.write(b"X" + header[1:])  # the member's name, changed: the same size, other bytes
    return path, offset - BLOCK, header


def restore(path: str, offset: int, header: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(header)


NO_PERIODIC = ["--ckpt_every", "0", "--ckpt_minutes", "0"]  # checkpoints only where the run stops


@pytest.fixture(scope="module")
def reference(shards, module_tmp):  # noqa: F811
    """test_train's uninterrupted 7-step run, without its checkpoint after every step."""
    out = module_tmp("reference") / "run"
    result = run(train_cmd(shards, out, *SEVEN_STEPS, *NO_PERIODIC))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def own_shards(shards, tmp_path):  # noqa: F811
    return shutil.copytree(shards, tmp_path / "shards")  # the same dataset (the same fingerprint), ours to damage


def test_a_damaged_shard_stops_the_run_with_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(
        own_shards, reference, tmp_path):  # noqa: F811
    path, *damage = damage_a_frame_first_read_at(own_shards, FAILING_STEP)
    out = tmp_path / "run"
    stopped = run(train_cmd(own_shards, out, *SEVEN_STEPS, *NO_PERIODIC))
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("train: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"train: error: {path}: no tar header of "), errors
    assert errors[0].endswith(f"stopped at step {FAILING_STEP}, saved as {out / 'step-000000003.pt'}: continue "
                              "with --resume auto once the data is restored")
    assert [p.name for p in step_checkpoints(out)] == ["step-000000003.pt"]
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == FAILING_STEP
    restore(path, *damage)
    resumed = run(train_cmd(own_shards, out, *SEVEN_STEPS, *NO_PERIODIC, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 7
    assert_same(model_of(out / "last.pt"), model_of(reference / "last.pt"))  # as if it had never stopped


def test_under_the_dali_loader(own_shards, tmp_path):
    path, *damage = damage_a_frame_first_read_at(own_shards, FAILING_STEP)
    out = tmp_path / "run"
    stopped = run(train_cmd(own_shards, out, "--max_steps", "6", "--loader", "dali", "--ckpt_minutes", "0"))
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("train: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"train: error: {path}: "), errors
    # DALI reads ahead, so the error may surface a step or two early: at a completed step boundary all the same.
    step = read_checkpoint(out / "last.pt")["progress"]["global_step"]
    assert 1 <= step <= FAILING_STEP and f"stopped at step {step}, saved as" in errors[0]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
            *args]


def test_two_ranks_stop_together_when_one_of_them_finds_the_shard_damaged(own_shards, tmp_path):
    path, *damage = damage_a_frame_first_read_at(own_shards, FAILING_STEP, only_rank=1)
    out = tmp_path / "run"
    args = ["--max_steps", "6", "--ckpt_minutes", "0"]
    stopped = run(torchrun(*train_cmd(own_shards, out, *args)[1:]))  # run() gives up after 600 s: no hang
    assert stopped.returncode != 0
    errors = [line for line in stopped.stderr.splitlines() if "train: error:" in line]
    assert len(errors) == 2, stopped.stderr[-3000:]  # each rank's own line, rank 1's cause in both
    assert any(f"train: error: {path}: no tar header of " in line for line in errors)
    assert any(f"train: error: rank 1: {path}: no tar header of " in line for line in errors)
    assert all(line.endswith(f"stopped at step {FAILING_STEP}, saved as {out / 'step-000000003.pt'}: continue with "
                             "--resume auto once the data is restored") for line in errors)
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == FAILING_STEP
    restore(path, *damage)
    resumed = run(torchrun(*train_cmd(own_shards, out, *args, "--resume", "auto")[1:]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 6
    assert os.path.exists(out / "step-000000006.pt")

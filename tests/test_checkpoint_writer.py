"""Checkpoints off the critical path: the background writer snapshots at the save, writes while training goes
on, makes a new save wait only for the previous write, verifies what it wrote, and reports failures; the
trainer checkpoints on its time cadence, where asked and at the end."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from stenvan.training import checkpoint_writer
from stenvan.checkpoint import CheckpointError, read_checkpoint, step_checkpoints, write_checkpoint_file
from stenvan.training.checkpoint_writer import CheckpointWriter
from stenvan.config import load_config
from tests.test_train import TINY, shards  # noqa: F401 - the module's shard fixture


def state(value: float) -> dict:
    return {"model": {"w": torch.full((1000,), value)}, "progress": {"global_step": int(value)},
            "optimizer": {"state": {0: {"step": torch.tensor(value)}}, "param_groups": [{"lr": 0.1}]}}


def test_save_snapshots_the_state_and_writes_while_the_caller_goes_on(tmp_path, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    real = checkpoint_writer.save_checkpoint

    def gated(*args, **kwargs):  # a write that takes as long as the test wants
        started.set()
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", gated)
    writer = CheckpointWriter(tmp_path, keep=5, log=lambda _: None)
    live = state(1.0)
    writer.save(live, step=1)  # returns while the write is still held at the gate
    assert started.wait(60) and not (tmp_path / "step-000000001.pt").exists()
    live["model"]["w"].fill_(99.0)  # training goes on and changes the parameters in place
    live["optimizer"]["state"][0]["step"] += 1
    live["optimizer"]["param_groups"][0]["lr"] = 0.5

    second = threading.Thread(target=writer.save, args=(state(2.0),), kwargs={"step": 2})
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # the next save waits for the previous write (and only for that)
    gate.set()
    second.join(timeout=60)
    writer.wait()
    first = read_checkpoint(tmp_path / "step-000000001.pt")
    assert torch.equal(first["model"]["w"], torch.full((1000,), 1.0))  # the values at the save, not later ones
    assert first["optimizer"]["state"][0]["step"] == 1.0 and first["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert read_checkpoint(tmp_path / "last.pt")["progress"]["global_step"] == 2
    assert writer.written == 2 and writer.wait_s > 0


def test_a_failed_write_stops_the_next_save(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder should be")
    writer = CheckpointWriter(blocker, keep=2, log=lambda _: None)
    writer.save(state(1.0), step=1)
    with pytest.raises(CheckpointError, match="writing a checkpoint in .*not-a-folder failed"):
        writer.wait()
    writer.wait()  # reported once


def test_write_is_verified_against_the_bytes_written(tmp_path, monkeypatch):
    from stenvan import checkpoint

    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: "0" * 64)  # the disk returns other bytes
    with pytest.raises(CheckpointError, match="read back differ"):
        write_checkpoint_file(state(1.0), tmp_path / "best.pt")
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp file left


def run_trainer(shards, out, *extra):  # noqa: F811
    from stenvan.training.trainer import Trainer

    trainer = Trainer(load_config(None, TINY + ["--batches_per_epoch", "2", "--keep_ckpts", "9", *extra],
                                  data=str(shards), out=str(out)))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_trainer_checkpoints_on_time_cadence_where_asked_and_at_the_end(shards, tmp_path):  # noqa: F811
    # 2 epochs of 2 steps, every 3 steps: step 3 where asked and step 4, the end; no more checkpoint at every
    # epoch end (step 2), each of which made every rank wait.
    records = run_trainer(shards, tmp_path / "steps", "--epochs", "2", "--ckpt_minutes", "0", "--ckpt_every", "3")
    assert [p.name for p in step_checkpoints(tmp_path / "steps")] == ["step-000000003.pt", "step-000000004.pt"]
    assert all(0 <= r["ckpt_wait_share"] < 1 for r in records if r["kind"] == "train")
    # A time cadence shorter than a step: a checkpoint after every step.
    run_trainer(shards, tmp_path / "time", "--epochs", "1", "--ckpt_minutes", "1e-9")
    assert [read_checkpoint(p)["progress"]["global_step"] for p in step_checkpoints(tmp_path / "time")] == [1, 2]


def test_snapshot_keeps_memory_layout(tmp_path):
    # A channels_last parameter's Adam moments must come back channels_last: the fused kernels walk a parameter
    # and its moments in memory order together (a contiguous moment gives a wrong update; seen on torch 2.14).
    moment = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    writer = CheckpointWriter(tmp_path, keep=2, log=lambda _: None)
    writer.save({"optimizer": {"exp_avg": moment}}, step=1)
    writer.wait()
    loaded = read_checkpoint(tmp_path / "last.pt")["optimizer"]["exp_avg"]
    assert torch.equal(loaded, moment) and loaded.stride() == moment.stride()

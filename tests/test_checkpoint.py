"""Checkpoints: atomic, verified, weights_only-loadable; a damaged newest one falls back to the previous."""

from __future__ import annotations

import os

import pytest
import torch

from stenvan.checkpoint import (CheckpointError, newest_valid_checkpoint, read_checkpoint, save_checkpoint,
                                step_checkpoints)


def state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "progress": {"global_step": step}, "config": {"lr": 1e-4}}


def test_save_keeps_newest_and_links_last(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint(state(step), tmp_path, step, keep=2)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-000000006.pt", "step-000000008.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == ["step-000000006.pt.sha256", "step-000000008.pt.sha256"]
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "step-000000008.pt")
    loaded = read_checkpoint(tmp_path / "last.pt")
    assert loaded["progress"]["global_step"] == 8 and loaded["format"] == "stenvan-checkpoint"
    torch.load(tmp_path / "last.pt", weights_only=True)  # plain torch can read it safely
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_newest_falls_back_to_previous(tmp_path, capsys, damage):
    for step in (1, 2):
        save_checkpoint(state(step), tmp_path, step, keep=3)
    newest = tmp_path / "step-000000002.pt"
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    newest.write_bytes(bytes(data))  # note: also changes last.pt, the same inode
    path, loaded = newest_valid_checkpoint(tmp_path)
    assert path.name == "step-000000001.pt" and loaded["progress"]["global_step"] == 1
    err = capsys.readouterr().err
    assert "skipping" in err and "step-000000002.pt" in err
    assert not newest.exists()  # set aside, so it no longer counts among the kept checkpoints
    assert newest.with_name(newest.name + ".bad").exists()
    save_checkpoint(state(3), tmp_path, 3, keep=2)  # pruning keeps the good ones
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-000000001.pt", "step-000000003.pt"]


def test_truncated_without_sidecar_is_detected(tmp_path):
    save_checkpoint(state(1), tmp_path, 1, keep=3)
    path = tmp_path / "step-000000001.pt"
    (tmp_path / "step-000000001.pt.sha256").unlink()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        read_checkpoint(path)


def test_foreign_files_are_clear_errors(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a stenvan checkpoint"):
        read_checkpoint(tmp_path / "other.pth")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        read_checkpoint(tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    assert newest_valid_checkpoint(tmp_path / "empty") is None

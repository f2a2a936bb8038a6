"""`compile: true` on the GPU (skipped without CUDA): the trainer's torch.compile'd model trains and its first
step's loss is the eager model's, within bf16 rounding. A file of its own: compiling takes the longest of the gpu
tests, and `make gpu-check` runs test files in parallel (pytest-xdist, one file per worker)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch._dynamo  # noqa: F401 - for OptimizedModule below

from stenvan.config import load_config
from tests.test_train import TINY, shards  # noqa: F401 - the module's shard fixture

pytestmark = pytest.mark.gpu


def train_losses(shards, out, *extra) -> tuple[list[float], object]:  # noqa: F811
    from stenvan.training.trainer import Trainer

    cfg = load_config(None, TINY + ["--device", "cuda", "--precision", "bf16", "--max_steps", "3", "--log_every", "1",
                                    "--ckpt_minutes", "0", *extra], data=str(shards), out=str(out))
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        forward = trainer.forward
    finally:
        trainer.close()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"], forward


def test_compiled_training_matches_eager(shards, tmp_path):  # noqa: F811
    eager, _ = train_losses(shards, tmp_path / "eager")
    compiled, forward = train_losses(shards, tmp_path / "compiled", "--compile", "true")
    assert isinstance(forward, torch._dynamo.eval_frame.OptimizedModule)  # the step really ran compiled
    assert len(compiled) == len(eager) == 3 and all(math.isfinite(v) for v in compiled), (eager, compiled)
    # The same weights and batch: the first loss agrees within bf16 rounding (later steps drift apart).
    assert abs(compiled[0] - eager[0]) <= 3e-2 * abs(eager[0]), (eager, compiled)

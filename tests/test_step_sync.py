"""A training step never waits for the device: the only scalar reads of a run are at the log points (every
`log_every` steps), where losses, non-finite counts and stop signals reach the host together."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stenvan.config import load_config
from tests.test_train import TINY, shards  # noqa: F401 - the module's shard fixture

LOG_EVERY, STEPS = 5, 10


class ScalarReads(TorchDispatchMode):
    """Records the training step at which each device-to-host scalar read happens.

    `.item()`, `float(t)` and `bool(t)` dispatch `aten._local_scalar_dense`; `.tolist()` of a CPU tensor reads
    memory without dispatching anything, so it is counted by wrapping `Tensor.tolist` (on a GPU it is a copy and
    a sync like the others).
    """

    def __init__(self, step_of):
        super().__init__()
        self.step_of, self.steps = step_of, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not in_dataloader_setup():
            self.steps.append(self.step_of())
        return func(*args, **(kwargs or {}))


def in_dataloader_setup() -> bool:
    """torch's DataLoader draws its workers' base seed from the CPU generator with `.item()` when an epoch's
    iterator starts: a read of host memory, never of the device, and not part of a training step."""
    return any(f.filename.endswith(os.path.join("torch", "utils", "data", "dataloader.py"))
               for f in traceback.extract_stack())


def test_only_log_points_read_scalars(shards, tmp_path, monkeypatch):  # noqa: F811
    from stenvan.training.trainer import Trainer

    cfg = load_config(None, TINY + ["--log_every", str(LOG_EVERY), "--max_steps", str(STEPS), "--ckpt_minutes", "0"],
                      data=str(shards), out=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    reads = ScalarReads(lambda: trainer.progress.global_step)
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        reads.steps.append(trainer.progress.global_step)
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    try:
        with reads:
            progress = trainer.fit()
    finally:
        monkeypatch.undo()
        trainer.close()
    assert progress.global_step == STEPS
    # One read per log window, at its log point (after steps 5 and 10); none inside the steps.
    assert reads.steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), reads.steps


@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["dali", "torch"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_run_clean_under_cuda_sync_debug_mode(shards, tmp_path, monkeypatch, loader,  # noqa: F811
                                                             precision):
    """On a GPU, a step raises if anything in it synchronises with the host (log points excluded): with either
    loader's batches (DALI's arrive on its own stream) and with fp16's GradScaler (fused Adam takes the scale and
    the found-inf flag as device tensors)."""
    from stenvan.training.trainer import Trainer

    cfg = load_config(None, TINY + ["--device", "cuda", "--log_every", "1000", "--max_steps", "4",
                                    "--ckpt_minutes", "0", "--precision", precision, "--loader", loader],
                      data=str(shards), out=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    real_step = Trainer._step

    def strict_step(self, batch, autocast):
        if self.progress.global_step == 0:  # the first step autotunes cuDNN kernels
            return real_step(self, batch, autocast)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            real_step(self, batch, autocast)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "_step", strict_step)
    try:
        assert trainer.fit().global_step == 4
    finally:
        trainer.close()

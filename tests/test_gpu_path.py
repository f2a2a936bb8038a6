"""The GPU training path (skipped without CUDA): fused non-local attention in bf16 at NVAN's shapes, our all-gather
over NCCL, fp16 with a GradScaler, and evaluation on the GPU right after training. Synchronised BatchNorm over
NCCL is in test_gpu_sync_batchnorm.py; `compile: true` in test_gpu_compile.py.
"""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

from benchmarks.non_local import SHAPES, SdpaKernels  # which fused SDPA kernel ran (none: the math fallback)
from stenvan.config import load_config
from stenvan.models.non_local import NonLocalBlock
from tests.test_train import TINY, shards  # noqa: F401 - the module's shard fixture

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


# NVAN's non-local blocks for 8-frame 256x128 clips: 4,096 tokens of d = 256 (layer2), 1,024 of d = 512 (layer3).
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_non_local_matches_reference_in_bf16(shape):
    """bf16 autocast, as training runs: the fused block (SDPA, scale 1) is as close to a float64 reference as the
    original's explicit matmul-softmax-matmul in bf16, forward and backward, and runs a fused kernel, never math."""
    channels, frames, height, width = SHAPES[shape]
    torch.manual_seed(0)
    fused = NonLocalBlock(channels, attention="fused").to(CUDA)
    torch.nn.init.normal_(fused.bn.weight)  # a non-identity block (its BN starts at zero)
    torch.nn.init.normal_(fused.bn.bias)
    reference = NonLocalBlock(channels, attention="reference").to(CUDA)
    reference.load_state_dict(fused.state_dict())
    exact = NonLocalBlock(channels, attention="reference").to(CUDA, torch.float64)
    exact.load_state_dict(fused.state_dict())
    x = torch.randn(2 * frames, channels, height, width, device=CUDA)  # 2 clips, (B·T, C, H, W)
    x = x.contiguous(memory_format=torch.channels_last)  # as the model runs
    grad_out = torch.randn_like(x)

    def run(block, dtype):
        inp = x.detach().to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.float64):
            out = block(inp, group_frames=frames) - inp  # the attention branch alone (x passes through exactly)
        out.backward(grad_out.to(dtype))
        return out.detach(), inp.grad, block.theta.weight.grad

    kernels = SdpaKernels()
    with kernels:
        got = run(fused, torch.float32)
    ours, original, truth = got, run(reference, torch.float32), run(exact, torch.float64)
    errors = {name: (relative_error(a, t), relative_error(b, t)) for name, a, b, t in
              zip(("output", "input grad", "theta weight grad"), ours, original, truth)}
    print(f"{shape}: SDPA kernel {sorted(kernels.kernels)}; relative error vs float64 (fused, reference): {errors}")
    assert kernels.kernels, f"{shape}: SDPA fell back to the math path (no fused kernel ran)"
    for name, (fused_error, reference_error) in errors.items():
        assert math.isfinite(fused_error) and fused_error < 5e-2, (shape, name, errors)
        assert fused_error <= 2 * reference_error + 1e-3, (shape, name, errors)


# ----------------------------------------------------------------------------------------------------------
# NCCL
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def nccl_world(monkeypatch):
    """A single-rank NCCL process group through env:// (what torchrun --nproc_per_node=1 sets up)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", init_method="env://", rank=0, world_size=1, device_id=CUDA)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_over_nccl(nccl_world):
    """Our gradient-carrying all-gather (the triplet loss's) runs over NCCL: all_gather forward, all_reduce back.
    Synchronised BatchNorm over NCCL is tested in test_gpu_sync_batchnorm.py."""
    from stenvan.distributed import _GatherWithGrad

    feats = torch.randn(8, 32, device=CUDA, requires_grad=True)
    gathered = _GatherWithGrad.apply(feats)
    (2 * gathered).sum().backward()
    assert torch.equal(gathered, feats) and torch.equal(feats.grad, torch.full_like(feats, 2.0))


# ----------------------------------------------------------------------------------------------------------
# The trainer on the GPU: fp16 + GradScaler, evaluation right after training
# ----------------------------------------------------------------------------------------------------------

def records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_fp16_with_grad_scaler_trains(shards, tmp_path):  # noqa: F811
    """precision fp16 (what `auto` picks before Ampere): DALI delivers fp16 clips, the GradScaler scales the loss,
    fused Adam unscales and skips overflowing steps on the device; the run ends with finite losses, updated
    weights and the scaler's state in the checkpoint."""
    from stenvan.checkpoint import read_checkpoint
    from stenvan.training.trainer import Trainer

    out = tmp_path / "run"
    # 16 steps: the scaler starts at 2^16 and halves on each overflowing step (skipped) until the gradients fit.
    cfg = load_config(None, TINY + ["--device", "cuda", "--precision", "fp16", "--loader", "dali", "--epochs", "5",
                                    "--max_steps", "16", "--log_every", "4", "--ckpt_minutes", "0"],
                      data=str(shards), out=str(out))
    trainer = Trainer(cfg)
    try:
        assert trainer.scaler.is_enabled() and trainer.precision == "fp16"
        initial = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}  # weights, not BN statistics
        assert trainer.fit().global_step == 16
    finally:
        trainer.close()
    state = read_checkpoint(out / "last.pt")
    scale = float(state["scaler"]["scale"])  # saved as a tensor (no host sync at the checkpoint)
    assert math.isfinite(scale) and 0 < scale <= 2.0 ** 16 and math.log2(scale).is_integer(), scale
    losses = [r["loss"] for r in records(out, "train") if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), losses
    changed = [k for k, v in initial.items() if not torch.equal(v.cpu(), state["model"][k])]
    assert len(changed) > len(initial) // 2, f"only {len(changed)} of {len(initial)} weights changed (scale {scale})"


def test_evaluation_on_the_gpu_right_after_training(shards, tmp_path, monkeypatch):  # noqa: F811
    """The trainer evaluates at the end of an epoch on the GPU: its DALI eval pipeline starts after CUDA is up
    (so its workers are spawned, not forked) and the metrics arrive."""
    from stenvan.data import dali_loader
    from stenvan.training.trainer import Trainer

    built = []
    real_build = dali_loader.build_pipeline

    def recording_build(source, **kwargs):
        built.append((type(source).__name__, torch.cuda.is_initialized()))
        return real_build(source, **kwargs)

    monkeypatch.setattr(dali_loader, "build_pipeline", recording_build)
    out = tmp_path / "run"
    cfg = load_config(None, TINY + ["--device", "cuda", "--loader", "dali", "--epochs", "1", "--eval_every", "1",
                                    "--eval_mode", "dense", "--ckpt_minutes", "0"], data=str(shards), out=str(out))
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert ("EvalSource", True) in built, built  # an eval pipeline built with CUDA initialised
    evals = records(out, "eval")
    assert len(evals) == 1
    assert 0 <= evals[0]["standard_mAP"] <= 1 and 0 <= evals[0]["standard_rank1"] <= 1, evals[0]


def test_an_fp16_checkpoint_state_is_taken_without_waiting_for_the_gpu(shards, tmp_path):  # noqa: F811
    """The state a checkpoint snapshots, GradScaler's included, comes without a host sync (GradScaler.state_dict()
    reads its scale with .item(): every fp16 checkpoint waited for the GPU); it saves and loads back."""
    from stenvan.checkpoint import read_checkpoint
    from stenvan.training.trainer import Trainer

    out = tmp_path / "run"
    cfg = load_config(None, TINY + ["--device", "cuda", "--precision", "fp16", "--max_steps", "2",
                                    "--ckpt_minutes", "0"], data=str(shards), out=str(out))
    trainer = Trainer(cfg)
    try:
        trainer.fit()  # the scaler has scaled two steps: its scale lives on the GPU
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            state = trainer.state()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        trainer.writer.save(state, step=99)
        trainer.writer.wait()
    finally:
        trainer.close()
    saved = read_checkpoint(out / "step-000000099.pt")["scaler"]
    assert math.isfinite(float(saved["scale"])) and float(saved["scale"]) == trainer.scaler.get_scale()

"""Two ranks on the GPU (skipped without CUDA): two processes share the one GPU over gloo, which takes CUDA tensors
(NCCL refuses two ranks on one device, and a world of one, where the all-gather is a copy and the backward
all-reduce adds nothing, cannot show a wrong combination). Our SyncBatchNorm's fused-kernel path against BatchNorm
on the whole batch (outputs, input and parameter gradients, running statistics); DDP + SyncBatchNorm +
torch.compile (Inductor) against eager; the triplet loss's all-gather against one process; and a checkpoint
written where more GPUs were visible resumes (its CUDA generator state). A file of its own: compiling takes long,
and `make gpu-check` runs test files in parallel (one file per worker)."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.sync_bn_workers import compiled_vs_eager, launch, layer_share, triplet_features, triplet_share
from tests.test_sync_batchnorm import check_layers

pytestmark = pytest.mark.gpu


def test_fused_sync_batchnorm_at_two_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    results = launch(functools.partial(layer_share, device="cuda"), 2, tmp_path)
    check_layers(results, 2)  # the bounds of the CPU test: fp32 1e-5, bf16 outputs within bf16's roundoff


def test_ddp_with_sync_batchnorm_compiled_by_inductor_trains_like_eager(tmp_path):
    results = launch(functools.partial(compiled_vs_eager, device="cuda", backend="inductor"), 2, tmp_path)
    for rank, result in enumerate(results):
        for step, (eager, compiled) in enumerate(zip(result["eager"]["steps"], result["compiled"]["steps"])):
            for key in ("y", "grad"):  # Inductor's fused kernels round differently than eager's
                torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5,
                                           msg=f"rank {rank}, step {step}: {key}")
        eager, compiled = result["eager"]["buffers"], result["compiled"]["buffers"]
        assert int(compiled["bn1.num_batches_tracked"]) == 3 and eager["bn1.running_var"].sub(1).abs().max() > 1e-2
        for key in eager:  # updated three times in the compiled run too, not frozen or dropped
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {key}")
        assert not [t for t in result["captured"] if "autograd_function_apply" in t or "batch_norm" in t]


def test_triplet_all_gather_at_two_ranks_equals_one_process(tmp_path):
    from stenvan.training.losses import batch_hard_triplet

    feats, labels = triplet_features()
    whole = feats.cuda().requires_grad_()
    truth = batch_hard_triplet(whole, labels.cuda())
    truth.backward()
    results = launch(functools.partial(triplet_share, device="cuda"), 2, tmp_path)
    rows = len(labels) // 2
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["triplet"], truth.detach().cpu(), rtol=1e-6, atol=1e-6)
        # Every rank's loss is the whole batch's: the gather's backward sums both ranks' gradients (DDP then
        # averages the parameters' gradients over the 2 ranks).
        torch.testing.assert_close(result["grad"], 2 * whole.grad[rank * rows:(rank + 1) * rows].cpu(), rtol=1e-5,
                                   atol=1e-6)


def test_a_checkpoint_of_a_node_with_more_gpus_resumes_its_cuda_generator():
    from stenvan.training.rng import rng_state, set_rng_state

    torch.cuda.init()
    torch.cuda.manual_seed(5)
    state = rng_state()
    expected = torch.rand(4, device="cuda")
    # As an 8-GPU node's older checkpoints stored it: every device's generator (IndexError here before).
    set_rng_state({**state, "cuda": [state["cuda"]] + [torch.cuda.get_rng_state()] * 7})
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    set_rng_state(state)  # what is saved now: the current device's alone
    assert torch.equal(torch.rand(4, device="cuda"), expected)

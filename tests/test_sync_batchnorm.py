"""Our synchronised BatchNorm (stenvan.models.sync_batchnorm) on the CPU over gloo: 2 and 4 processes, each with
its cross-section of a batch, equal BatchNorm on the whole batch in one process (outputs, input gradients, DDP's
averaged weight/bias gradients, running statistics, eval outputs; 1d and 2d, contiguous and channels_last, fp32
and bf16 autocast); a converted model's forward+backward reads nothing from the device; the conversion keeps
parameters, buffers, requires_grad and the state-dict keys. The GPU (fused kernels, NCCL, CUDA's sync debug
mode) is tested in test_gpu_path.py; the 1-vs-2-process training run with `--sync_bn true` in test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from stenvan.models import build_model
from stenvan.models.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from tests.sync_bn_workers import (BATCH, CASES, STEPS, HostReads, compiled_vs_eager, launch, layer_share,
                                   make_batch, make_layer, model_step_reads, share)


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def one_process(case) -> dict:
    """torch's BatchNorm on the whole batch, fp32 (the bf16 cases' inputs are bf16 values): the truth."""
    layer = make_layer(case)
    steps = []
    for step in range(STEPS):
        x, g = make_batch(case, step)
        inp = x.clone().requires_grad_()
        y = layer(inp)
        ((y * g).sum() / BATCH).backward()  # the loss: mean over the batch's rows
        steps.append({"y": y.detach(), "x_grad": inp.grad, "weight_grad": layer.weight.grad,
                      "bias_grad": layer.bias.grad})
        layer.zero_grad(set_to_none=True)
    layer.eval()
    with torch.no_grad():
        eval_out = layer(make_batch(case, STEPS)[0])
    return {"steps": steps, "eval": eval_out, **layer.state_dict()}


def both(rank: int, world: int) -> dict:
    return {"layers": layer_share(rank, world), "model": model_step_reads(rank, world)}


@pytest.fixture(scope="module")
def two_ranks(module_tmp):
    return launch(both, 2, module_tmp("two_ranks"))


def check_layers(results: list, world: int) -> None:
    for case in CASES:
        want = one_process(case)
        # fp32: only the order of the float sums differs (measured <= 3e-6, channel means 5-20x the spread).
        # bf16: the output and the input gradient are rounded to bf16, whose unit roundoff 2^-8 ≈ 3.9e-3 bounds
        # each element's relative error and so the norm's (measured 1.8-2.4e-3); the statistics, the running
        # statistics and the weight/bias gradients are fp32 sums of bf16-exact values, as tight as fp32
        # (statistics taken in bf16 would be off by ~2^-8 of the channel mean: tens of times these bounds).
        rounded = 2 ** -8 if case.bf16 else 1e-5
        for rank, result in enumerate(results):
            got, where = result[case.name], f"{case.name}, rank {rank} of {world}"
            assert got["type"] == "SyncBatchNorm" and got["bias_requires_grad"] == (not case.frozen_bias), where
            for step, (mine, truth) in enumerate(zip(got["steps"], want["steps"])):
                at = f"{where}, step {step}"
                assert mine["y"].dtype == (torch.bfloat16 if case.bf16 else torch.float32), at
                assert relative_error(mine["y"], share(truth["y"], rank, world)) < rounded, at
                # Each rank's loss is its rows' mean: W times its share of the batch mean (DDP's convention).
                assert relative_error(mine["x_grad"], world * share(truth["x_grad"], rank, world)) < rounded, at
                # DDP's average of the ranks' local weight/bias gradients = the whole batch's gradient.
                assert relative_error(mine["weight_grad"], truth["weight_grad"]) < 1e-5, at
                if case.frozen_bias:
                    assert mine["bias_grad"] is None and truth["bias_grad"] is None, at
                else:
                    assert relative_error(mine["bias_grad"], truth["bias_grad"]) < 1e-5, at
                if case.channels_last:
                    assert mine["channels_last"] == (True, True), at  # output and input gradient
            for key in ("running_mean", "running_var"):
                assert relative_error(got[key], want[key]) < 1e-5, f"{where}: {key}"
            assert int(got["num_batches_tracked"]) == STEPS, where
            assert relative_error(got["eval"], want["eval"]) < 1e-5, where


def test_two_ranks_equal_batchnorm_on_the_whole_batch(two_ranks):
    check_layers([r["layers"] for r in two_ranks], 2)


def test_four_ranks_equal_batchnorm_on_the_whole_batch(tmp_path):
    check_layers(launch(layer_share, 4, tmp_path), 4)


def test_converted_model_reads_nothing_from_the_device(two_ranks):
    """Forward + backward of a tiny STE-NVAN with every BatchNorm synchronised, under DDP over 2 gloo ranks, the
    re-id loss over the global batch: no scalar read, no data-dependent shape, no .tolist(), on any pass."""
    for rank, result in enumerate(two_ranks):
        model = result["model"]
        assert model["converted"] == 59  # 53 in ResNet-50, 5 in the NL blocks, the head's
        assert model["reads"] == [[], [], []], f"rank {rank}: {model['reads']}"
        assert model["stats_moved"] > 1e-3  # the synchronised path really ran (training statistics)


def test_host_read_counter_sees_what_would_sync_a_gpu():
    """Not vacuous: the counter of the test above sees torch SyncBatchNorm's empty-rank mask and the usual reads."""
    counts = torch.tensor([[2.0], [0.0], [3.0]])
    with HostReads() as reads:
        counts[counts.squeeze(-1) >= 1]  # torch/nn/modules/_functions.py: count_all[mask]
        counts.tolist()
        counts.sum().item()
    assert reads.seen == ["index", "tolist", "_local_scalar_dense"]


def test_conversion_keeps_parameters_buffers_and_keys():
    torch.manual_seed(0)
    plain = build_model("ste_nvan", 5, stripes=2)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    params = dict(plain.named_parameters())
    frozen = {k for k, p in params.items() if not p.requires_grad}
    assert frozen == {"head.bn.bias"}  # the BNNeck's bias
    converted = convert_sync_batchnorm(plain)
    kinds = {type(m) for m in converted.modules()}
    assert SyncBatchNorm in kinds and not any(issubclass(k, torch.nn.modules.batchnorm._BatchNorm)
                                              and k is not SyncBatchNorm for k in kinds)
    state = converted.state_dict()
    assert list(state) == list(before)  # same keys, same order: checkpoints load into the plain model
    for key, value in before.items():
        assert torch.equal(state[key], value), key
    for key, p in converted.named_parameters():
        assert p is params[key] and p.requires_grad == (key not in frozen), key  # same objects, optimizer-safe
    fresh = build_model("ste_nvan", 5, stripes=2)
    fresh.load_state_dict(state, strict=True)  # eval.py and a one-process resume build the plain model
    # Without a process group (one process, e.g. evaluating a converted model) it is plain BatchNorm.
    converted.train()
    x = torch.randn(4, 6, 5, 3)
    layer, reference = convert_sync_batchnorm(torch.nn.BatchNorm2d(6)), torch.nn.BatchNorm2d(6)
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)


def test_ddp_with_sync_batchnorm_compiled_trains_like_eager(tmp_path):
    """torch.compile of DDP with our SyncBatchNorm (2 ranks, gloo, the plain-op path the CPU takes): outputs,
    gradients and the running statistics of 3 steps equal eager training's. The synchronised function runs outside
    the compiled graph: on GPUs its fused kernels have no fake-tensor kernels and one updates the running
    statistics in place without declaring it (a graph would drop that update, or freeze it in a CUDA graph). The
    fused path under Inductor at 2 ranks on one GPU: test_gpu_two_ranks.py."""
    results = launch(compiled_vs_eager, 2, tmp_path)
    for rank, result in enumerate(results):
        for step, (eager, compiled) in enumerate(zip(result["eager"]["steps"], result["compiled"]["steps"])):
            for key in ("y", "grad"):
                torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6,
                                           msg=f"rank {rank}, step {step}: {key}")
        eager, compiled = result["eager"]["buffers"], result["compiled"]["buffers"]
        assert int(eager["bn1.num_batches_tracked"]) == 3 and eager["bn1.running_var"].sub(1).abs().max() > 1e-2
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {key}")
        # The graphs hold the convolutions, and nothing of the synchronised function (statistics, all-gather).
        captured = result["captured"]
        assert any("conv2d" in t for t in captured), captured
        assert not [t for t in captured if any(s in t for s in ("autograd_function_apply", "var_mean", "all_gather",
                                                               "batch_norm"))], captured

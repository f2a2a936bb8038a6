"""Our synchronised BatchNorm on the GPU over NCCL (skipped without CUDA): its fused kernels and its plain-op path
against torch's SyncBatchNorm and torch's BatchNorm; a DDP model with it trains like the plain model; and a few
training steps with it run clean under CUDA's sync debug mode.

One process forms a world of one on one GPU (NCCL refuses two ranks on the same device). Our module synchronises
whenever a process group exists, so at W = 1 it still runs its whole path (statistics all-gathered over NCCL,
combined, the backward's all-reduce); torch's SyncBatchNorm module would fall back to BatchNorm there, so its
autograd function is called directly. The arithmetic over several ranks is tested on the CPU over gloo
(test_sync_batchnorm.py), with the same combination code as the plain-op path here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stenvan.models.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from tests.test_gpu_path import CUDA, nccl_world, relative_error  # noqa: F401 - the NCCL fixture

pytestmark = pytest.mark.gpu


def run_layer(kind: str, x: torch.Tensor, weight, bias, grad_out, group) -> dict:
    """One training forward + backward of a BatchNorm over x: (output, input/weight/bias gradients, running stats)."""
    inp, w, b = x.detach().clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    running_mean, running_var = torch.full_like(weight, 0.5), torch.full_like(weight, 2.0)
    if kind in ("fused", "plain"):
        layer = SyncBatchNorm(weight.numel(), fused=kind == "fused").to(CUDA)
        layer.weight, layer.bias = torch.nn.Parameter(w), torch.nn.Parameter(b)
        layer.running_mean.copy_(running_mean)
        layer.running_var.copy_(running_var)
        w, b = layer.weight, layer.bias
        y = layer(inp)
        running_mean, running_var = layer.running_mean, layer.running_var
    elif kind == "torch":  # torch's synchronised function (its module would not synchronise a world of one)
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNorm

        y = TorchSyncBatchNorm.apply(inp, w, b, running_mean, running_var, 1e-5, 0.1, group, 1)
    else:  # torch's BatchNorm on the fp32 values, with an fp32 input gradient
        inp = x.detach().float().requires_grad_()
        y = F.batch_norm(inp, running_mean, running_var, w, b, training=True, momentum=0.1, eps=1e-5)
    y.backward(grad_out.to(y.dtype))
    return {"output": y.detach(), "input grad": inp.grad, "weight grad": w.grad, "bias grad": b.grad,
            "running mean": running_mean, "running var": running_var}


@pytest.mark.parametrize("layout", ["2d channels_last", "2d", "1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sync_batchnorm_equals_torch_sync_batchnorm_and_batchnorm(nccl_world, layout, dtype):
    """fused (the default on GPUs), plain ops, torch's SyncBatchNorm function and BatchNorm in fp32 agree. bf16
    input (as under autocast): the outputs and input gradients are bf16 (within its unit roundoff 2^-8 of the fp32
    truth), the statistics and parameter gradients fp32 and as tight as fp32."""
    torch.manual_seed(0)
    shape = (16, 64, 8, 4) if layout.startswith("2d") else (16, 64)
    x = (3 * torch.randn(shape, device=CUDA) + 5).to(dtype)
    if layout == "2d channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias, grad_out = torch.randn(64, device=CUDA), torch.randn(64, device=CUDA), torch.randn(shape, device=CUDA)
    grad_out = grad_out.to(dtype).float()  # representable in the input's dtype: every path sees the same dy
    results = {kind: run_layer(kind, x, weight, bias, grad_out, nccl_world.group.WORLD)
               for kind in ("fused", "plain", "torch", "batchnorm")}
    rounded = 2 ** -8 if dtype == torch.bfloat16 else 1e-5
    for kind in ("fused", "plain", "torch"):
        for name, value in results[kind].items():
            bound = rounded if name in ("output", "input grad") else 1e-5
            error = relative_error(value, results["batchnorm"][name])
            assert error < bound, f"{kind} {layout} {dtype}: {name} off by {error:.2e} (bound {bound:.0e})"
        assert results[kind]["output"].dtype == dtype and results[kind]["input grad"].dtype == dtype
        if layout == "2d channels_last":
            assert results[kind]["output"].is_contiguous(memory_format=torch.channels_last), kind
    # Ours fused vs torch's: the same kernels on the same numbers (only the combination is ours).
    for name in results["torch"]:
        torch.testing.assert_close(results["fused"][name], results["torch"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_ddp_with_sync_batchnorm_steps_like_the_plain_model(nccl_world):
    """A tiny STE-NVAN as the trainer builds it for several GPUs (our SyncBatchNorm, channels_last, DDP over NCCL,
    the re-id loss) takes the same SGD step as the plain model on the same batch: running statistics within 1e-3 of
    their update, weights within 5e-2. One step: this tiny untrained model's gradients through ~60 live BatchNorms
    are ill-conditioned (on the CPU, fp32 vs fp64 gradients differ by 1.8e-2; the plain-op path vs BatchNorm after
    one step by 2.5e-5 and 1.5e-2), and a second step amplifies a 1e-6 weight perturbation to tens of percent."""
    from torch.nn.parallel import DistributedDataParallel

    from stenvan.training.losses import ReIDLoss
    from stenvan.models import build_model
    from stenvan.training.optim import build_optimizer

    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # the same conv kernels
    try:
        torch.manual_seed(1)
        clips = torch.randn(8, 4, 3, 32, 16, device=CUDA)  # (B, T, 3, H, W): 4 ids x 2 clips
        labels = torch.arange(8, device=CUDA) // 2
        states, converted = [], 0
        for synchronised in (True, False):
            torch.manual_seed(0)
            model = build_model("ste_nvan", 4, stripes=2)
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            if synchronised:
                model = convert_sync_batchnorm(model)
                converted = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
            model = model.to(CUDA).to(memory_format=torch.channels_last)
            forward = DistributedDataParallel(model, device_ids=[CUDA.index]) if synchronised else model
            optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", lr=1e-3,
                                        weight_decay=0.0)
            feats, logits = forward(clips)
            ReIDLoss()(feats, logits, labels)["loss"].backward()
            optimizer.step()
            states.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
        assert converted == 59  # every BatchNorm of the synchronised model
        synced, plain = states
        assert synced.keys() == plain.keys() == initial.keys()
        for kind, bound in (("running", 1e-3), ("weights", 5e-2)):
            keys = [k for k in plain if plain[k].is_floating_point() and ("running_" in k) == (kind == "running")]
            update = sum((plain[k].double() - initial[k].double()).norm() ** 2 for k in keys) ** 0.5
            differ = sum((plain[k].double() - synced[k].double()).norm() ** 2 for k in keys) ** 0.5
            assert update > 1e-3, kind  # the steps moved them
            assert differ < bound * update, f"{kind}: differ by {differ / update:.2e} of the update"
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def test_training_steps_with_sync_batchnorm_run_clean_under_sync_debug_mode(nccl_world):
    """The trainer's step (bf16 autocast, DDP over NCCL, the re-id loss, the non-finite flag all-reduced, fused Adam
    skipping on the device) with every BatchNorm synchronised raises if anything waits for the GPU: torch's
    SyncBatchNorm would, once per BatchNorm layer (its empty-rank mask)."""
    from torch.nn.parallel import DistributedDataParallel

    from stenvan.training.losses import ReIDLoss
    from stenvan.models import build_model
    from stenvan.training.optim import build_optimizer, step_unless

    torch.manual_seed(0)
    model = convert_sync_batchnorm(build_model("ste_nvan", 4, stripes=2)).to(CUDA).to(
        memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model, device_ids=[CUDA.index])
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], "adam", lr=1e-4,
                                weight_decay=5e-5)
    criterion = ReIDLoss()
    clips = torch.randn(8, 4, 3, 32, 16, device=CUDA, dtype=torch.bfloat16)  # as the loader delivers them
    labels = torch.arange(8, device=CUDA) // 2
    losses = []
    for step in range(5):
        strict = step >= 2  # the first steps autotune cuDNN and build DDP's buckets
        if strict:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats, logits = ddp(clips)
                loss = criterion(feats, logits, labels)["loss"]
            bad = (~torch.isfinite(loss.detach())).float()
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            loss.backward()
            step_unless(optimizer, bad)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v).item() for v in losses)
    assert int(model.head.bn.num_batches_tracked) == 5
    assert (model.head.bn.running_var - 1).abs().max().item() > 1e-3  # synchronised training statistics moved

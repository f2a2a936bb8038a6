"""Synchronised BatchNorm with no host-device sync, on NCCL and gloo: the statistics of the global batch.

With W ranks each holding P·K/W clips, every BatchNorm layer normalises with the mean and variance of the whole
batch, as one process holding it would, and its running statistics learn those. torch's `nn.SyncBatchNorm`
computes the same, but drops empty ranks with a boolean mask (`count_all[mask]`, torch/nn/modules/_functions.py),
so each of STE-NVAN's 59 BatchNorm layers waits for the GPU once per forward; and its kernels exist only
on GPUs. Here:

- **No rank is ever empty, so nothing is masked.** The sampler gives every rank P·K/W ≥ 1 clips (P·K divisible
  by W is checked at start-up); `SyncBatchNorm.forward` checks it again from the input's shape (host metadata,
  never its values) and raises on an empty share instead of hanging.
- **Forward**: each rank's per-channel statistics and count, in float32 whatever the input dtype, are all-gathered
  ((W, 2C+1) floats: W·(2C+1) elements per layer) and combined on the device into the global mean and variance.
  Counts ride along as floats, exact up to 2^24 values per channel and rank (MARS's paper batch: 2.1 M in all).
- **Backward**: every rank's input gradient depends on every rank's output gradient through the shared mean and
  variance, so the per-channel Σdy and Σdy·(x−μ) are all-reduced (summed) before the input gradient. The weight
  and bias gradients are each rank's own share and stay local: DDP averages them with every other parameter's,
  which is what makes the update equal one process's on the whole batch (a sum here would count them W times).
- **Per-element work**: on GPUs, the fused kernels torch's SyncBatchNorm uses (`torch.batch_norm_stats` reads the
  input once and returns fp32 statistics of bf16/fp16 input; `batch_norm_gather_stats_with_counts` combines them
  and updates the running statistics in one kernel; the backward's reduce and element-wise kernels): as few
  launches and memory passes per layer as torch's, minus the sync. Elsewhere (the CPU), and on request on a GPU
  (`fused=False`, the reference the GPU test compares the kernels with), plain torch ops: `var_mean` on an fp32
  view, Chan et al.'s exact parallel combination of (mean, M2, count), and the BatchNorm backward formula.
- Output in the input's dtype (bf16 under autocast, like torch's BatchNorm), channels_last kept; the backward saves
  the input and the per-channel statistics only (no normalised copy), like torch's.
- Eval mode (and any use without a process group, e.g. a converted model evaluated alone) is plain BatchNorm.
- **torch.compile**: the synchronised function always runs eagerly, outside the compiled graph (a graph break per
  layer; the convolutions between them still compile). The fused kernels have no meta (fake-tensor) kernels, so
  the compiler cannot trace them, and `batch_norm_gather_stats_with_counts` updates the running statistics in
  place without its schema saying so: inside a graph that update could be dropped or, replayed from a CUDA graph,
  freeze the statistics silently. Eagerly, compiled training keeps eager training's running statistics (tested).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


def _all_gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """(D,) on every rank -> (W, D), rows in rank order (one NCCL kernel; gloo lacks all_gather_into_tensor)."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "gloo":
        rows = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(rows, local, group=group)
        return torch.stack(rows)
    out = local.new_empty(world, local.numel())
    dist.all_gather_into_tensor(out, local, group=group)
    return out


def _channel_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) broadcasting over an input of `dim` dimensions."""
    return t.view(1, -1, *([1] * (dim - 2)))


class _SyncBatchNormFunction(torch.autograd.Function):
    """x: (N, C, *) this rank's share -> BN(x) with the statistics of all ranks' shares; same shape and dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, fused):
        with torch.autocast(x.device.type, enabled=False):  # statistics in fp32 whatever the autocast dtype
            if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
                x = x.contiguous()  # the fused kernels take these two layouts
            channels, dims = x.shape[1], [0, *range(2, x.dim())]
            count = x.numel() // channels  # values per channel on this rank: host metadata, no sync
            if fused:
                mean, invstd = torch.batch_norm_stats(x, eps)  # (C,) each, fp32, one pass
                local = torch.cat([mean, invstd, mean.new_full((1,), count)])  # (2C+1,)
            else:
                var, mean = torch.var_mean(x.float(), dims, correction=0)  # (C,) each
                local = torch.cat([mean, var * count, mean.new_full((1,), count)])  # (mean, M2, count)
            gathered = _all_gather_rows(local, group)  # (W, 2C+1)
            counts = gathered[:, 2 * channels]  # (W,) values per channel on each rank
            if fused:
                # Global mean and 1/sqrt(var + eps); running statistics updated in the same kernel (unbiased var).
                mean, invstd = torch.batch_norm_gather_stats_with_counts(
                    x, gathered[:, :channels], gathered[:, channels:2 * channels], running_mean, running_var,
                    momentum, eps, counts)
                out = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
            else:
                # Chan et al.: M2 = Σ M2_r + Σ n_r (μ_r − μ)², differences after the mean: no cancellation.
                means, m2s = gathered[:, :channels], gathered[:, channels:2 * channels]  # (W, C) each
                n = counts.sum()  # 0-d: values per channel in the global batch
                mean = (counts[:, None] * means).sum(0) / n  # (C,)
                m2 = m2s.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)  # (C,)
                var = m2 / n  # biased: what normalises the batch
                invstd = torch.rsqrt(var + eps)
                if running_mean is not None:  # torch's BatchNorm update: unbiased variance, momentum
                    running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
                    running_var.copy_(momentum * (m2 / (n - 1)) + (1 - momentum) * running_var)
                out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)  # input's dtype and layout
        ctx.save_for_backward(x, weight, mean, invstd, counts)  # the input and (C,)/(W,) vectors: no x̂ copy
        ctx.group, ctx.fused = group, fused
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, counts = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_weight, need_bias = need_weight and weight is not None, need_bias and weight is not None
        grad_input = grad_weight = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            dim = x.dim()
            if ctx.fused:
                if not (grad_out.is_contiguous() or grad_out.is_contiguous(memory_format=torch.channels_last)):
                    grad_out = grad_out.contiguous()
                sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
                    grad_out, x, mean, invstd, weight, need_input, need_weight, need_bias)
            else:
                dims = [0, *range(2, dim)]
                xmu = x - _channel_view(mean, dim)  # fp32 (type promotion), x's layout
                sum_dy = grad_out.sum(dims, dtype=torch.float32)  # (C,)
                sum_dy_xmu = (grad_out * xmu).sum(dims)  # (C,) fp32
                grad_weight = sum_dy_xmu * invstd if need_weight else None  # Σ dy·x̂ over this rank's share
                grad_bias = sum_dy if need_bias else None
            if need_input:
                # Σdy and Σdy·(x−μ) of the whole batch: each rank's outputs moved the shared mean and variance.
                # All ranks agree on need_input (the same model), so they all join this all-reduce.
                sums = torch.cat([sum_dy, sum_dy_xmu])  # (2C,)
                dist.all_reduce(sums, group=ctx.group)
                sum_dy, sum_dy_xmu = sums.split(mean.numel())
                if ctx.fused:
                    w = weight.to(mean.dtype) if weight is not None else None
                    grad_input = torch.batch_norm_backward_elemt(grad_out, x, mean, invstd, w, sum_dy, sum_dy_xmu,
                                                                 counts.to(torch.int32))
                else:
                    n = counts.sum()
                    scale = invstd if weight is None else invstd * weight  # (C,)
                    # dx = w·invstd·(dy − Σdy/n − (x−μ)·invstd²·Σdy(x−μ)/n), sums over the global batch
                    grad_input = (grad_out - _channel_view(sum_dy / n, dim)
                                  - xmu * _channel_view(invstd * invstd * sum_dy_xmu / n, dim))
                    grad_input = (grad_input * _channel_view(scale, dim)).to(x.dtype)
        # The weight and bias gradients stay this rank's: DDP averages them (see the module docstring).
        return (grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None,
                None, None, None, None, None, None)


@torch.compiler.disable  # never inside a compiled graph: see the module docstring
def _synchronised_batch_norm(x, weight, bias, running_mean, running_var, eps, momentum, group, fused):
    return _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, eps, momentum, group, fused)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over inputs (N, C, *) (1d: (N, C) or (N, C, L); 2d: (N, C, H, W); ...) whose training statistics
    are those of the whole batch held by the ranks of `process_group` (default: all), without a host sync.

    Same parameters, buffers and state-dict keys as torch's BatchNorm. `fused`: None = torch's fused kernels on
    GPUs and plain torch ops elsewhere; False = plain ops everywhere (a reference). Momentum must be a number:
    the cumulative average (momentum=None) would need the batch count on the host.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, fused: bool | None = None):
        if momentum is None:
            raise ValueError("SyncBatchNorm: momentum=None (cumulative average) is not supported; give a number")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group
        self.fused = fused

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, ...) input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)  # eval (running statistics) or no process group: plain BatchNorm
        group = self.process_group or dist.group.WORLD
        count = x.numel() // x.shape[1]  # this rank's values per channel (shapes live on the host: no sync)
        if count == 0:
            raise ValueError(f"SyncBatchNorm: this rank (rank {dist.get_rank()}) holds an empty share of the batch; "
                             "every rank must hold at least one sample (P·K must be divisible by the world size)")
        if count == 1 and dist.get_world_size(group) == 1:
            raise ValueError("SyncBatchNorm: expected more than 1 value per channel when training, got 1")
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)  # on the device
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        fused = x.is_cuda if self.fused is None else self.fused
        return _synchronised_batch_norm(x, self.weight, self.bias, *running, self.eps, self.momentum, group, fused)


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None,
                           fused: bool | None = None) -> torch.nn.Module:
    """`module` with every BatchNorm layer (torch's SyncBatchNorm too) replaced by `SyncBatchNorm`, which takes
    over its parameters (the same objects: requires_grad kept, e.g. the head's frozen bias), buffers and mode;
    state-dict keys do not change, so checkpoints load into the plain model. Returns the (new if `module` is itself
    a BatchNorm) module."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, fused)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group, fused))
    return out

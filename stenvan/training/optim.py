"""The optimizer, and an optimizer step that a non-finite loss skips on the device (no host-device sync).

Fused kernels on every device (torch has fused Adam, AdamW and SGD for CUDA and the CPU): one kernel per step,
and a `found_inf` input (the protocol GradScaler uses) with which the kernel itself leaves the parameters and
the optimizer state untouched. The foreach and single-tensor kernels read their step counters with `.item()`
(a host sync per parameter group on a GPU) and accept no `found_inf`.
"""

from __future__ import annotations

import torch


def build_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float):
    """adam | adamw | sgd (momentum 0.9), fused."""
    if name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, fused=True)
        # Fused SGD allocates its momentum buffers uninitialised on its first step and keeps them even when
        # found_inf skips that step (torch 2.14); zeros give the same first update (buf = grad) and no garbage.
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return optimizer
    if name not in ("adam", "adamw"):
        raise ValueError(f"optimizer={name!r}; valid values are adam, adamw, sgd")
    opt_class = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return opt_class(params, lr=lr, weight_decay=weight_decay, fused=True)


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`optimizer.step()`, which does nothing where `found_inf` (a 0-d float tensor on the parameters' device,
    1.0 = skip) says so; decided on the device, so nothing waits for the GPU."""
    optimizer.grad_scale, optimizer.found_inf = None, found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """0-d float tensor on the parameters' device: 1.0 if any gradient of the optimizer's parameters holds a NaN or
    an infinity. A finite loss can have them (an overflow in a bf16 backward); stepping on them writes NaN weights.

    Decided on the device, by the multi-tensor kernel GradScaler uses (with a scale of 1: the gradients keep their
    values): no host sync, one pass over the gradients per dtype.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    device = optimizer.param_groups[0]["params"][0].device
    found, one = torch.zeros(1, device=device), torch.ones(1, device=device)
    for grads in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    return found[0]


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (Adam's moments, SGD's momentum) its parameter's memory layout.

    The fused kernels walk a parameter, its gradient and its state in memory order together, so a state tensor
    with other strides than its parameter updates each element with another element's moments.
    `Optimizer.load_state_dict` keeps the saved strides: resuming a channels_last run with `--channels_last false`
    (or the reverse) would do that to every convolution weight, silently.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)  # p's strides, value's values


class RunningStatistics:
    """BatchNorm's running statistics, put back on the device after a skipped step: the forward updated them before
    the step was known to be bad, and a non-finite forward (the reason most steps are skipped) makes them NaN for
    good (every later update mixes the NaN in), which evaluation and every later checkpoint would then carry.

    `snapshot()` before the forward copies them all into one flat tensor; `restore_if(bad, snapshot)` puts that
    copy back where `bad` (0-d, 1.0 = skipped) says so: a few kernels per step (two concatenations, a `where`, one
    multi-tensor copy), no host sync.
    """

    def __init__(self, model: torch.nn.Module):
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]
        self.buffers = [b for m in bns for b in (m.running_mean, m.running_var)]

    def _flat(self) -> torch.Tensor:
        return torch.cat([b.reshape(-1) for b in self.buffers])

    def snapshot(self) -> torch.Tensor | None:
        return self._flat() if self.buffers else None

    def restore_if(self, bad: torch.Tensor, snapshot: torch.Tensor | None) -> None:
        if snapshot is None:
            return
        kept = torch.where(bad.bool(), snapshot, self._flat())  # NaN-safe, unlike any arithmetic blend
        torch._foreach_copy_(self.buffers, [part.view_as(b) for part, b in
                                            zip(kept.split([b.numel() for b in self.buffers]), self.buffers)])

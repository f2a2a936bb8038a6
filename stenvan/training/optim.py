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

"""FLOP counting with torch.utils.flop_counter, including the CPU's fused attention kernel.

FlopCounterMode knows the CUDA SDPA kernels (flash, memory-efficient, cuDNN) but not the CPU's
`_scaled_dot_product_flash_attention_for_cpu`, which it would count as 0: here it gets the same formula (two
batched matmuls), so fused and reference attention count alike. On the meta device SDPA decomposes into bmm
and is counted as such.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts the CPU fused attention kernel (forward and backward)."""
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
    })


@torch.no_grad()
def forward_gflops(model: torch.nn.Module, clips: torch.Tensor) -> float:
    """Forward GFLOPs (conv + matmul, 2 per multiply-add) of `model(clips)`; clips may live on the meta device."""
    with flop_counter() as counter:
        model(clips)
    return counter.get_total_flops() / 1e9

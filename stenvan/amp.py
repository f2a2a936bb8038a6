"""Mixed precision: the one place that maps a precision name to an autocast dtype."""

from __future__ import annotations

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on a GPU and fp32 on the CPU; fp16 needs a GPU (its GradScaler is a CUDA feature here)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in AMP_DTYPES:
        raise ValueError(f"precision={precision!r}; valid values are auto, bf16, fp16, fp32")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """An autocast context for `precision` (a no-op context for fp32)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision], enabled=precision != "fp32")

"""Mixed precision: the one place that maps a precision name to an autocast dtype."""

from __future__ import annotations

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gpu_compute_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, asked of NVML when it can answer, so that CUDA itself is not started.

    The precision decides the loader's output dtype, and the loader's DALI workers fork before CUDA may be
    initialised. Without NVML (e.g. a container without libnvidia-ml) the CUDA runtime answers; DALI then spawns
    its workers instead of forking them (slower start, same result).
    """
    from ctypes import CDLL, byref, c_int, c_void_p

    try:
        nvml = CDLL("libnvidia-ml.so.1")
        index = torch.cuda._get_nvml_device_index(device)  # honours CUDA_VISIBLE_DEVICES, as device_count() does
        handle, major, minor = c_void_p(), c_int(), c_int()
        if (nvml.nvmlInit_v2() == 0 and nvml.nvmlDeviceGetHandleByIndex_v2(index, byref(handle)) == 0
                and nvml.nvmlDeviceGetCudaComputeCapability(handle, byref(major), byref(minor)) == 0):
            return major.value, minor.value
    except (OSError, AttributeError, RuntimeError):
        pass
    return torch.cuda.get_device_capability(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on a GPU that computes it natively (compute capability 8.0+: A100, H100, ...), fp16 with a
    GradScaler on older GPUs (V100 emulates bf16, slowly), and fp32 on the CPU. fp16 needs a GPU (its
    GradScaler is a CUDA feature here)."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if gpu_compute_capability(device) >= (8, 0) else "fp16"
    if precision not in AMP_DTYPES:
        raise ValueError(f"precision={precision!r}; valid values are auto, bf16, fp16, fp32")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """An autocast context for `precision` (a no-op context for fp32)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision], enabled=precision != "fp32")


def scaler_state(scaler: torch.amp.GradScaler) -> dict:
    """`GradScaler.state_dict()` without waiting for the GPU (that one reads the scale and the growth tracker with
    `.item()`): the two stay device tensors, which the checkpoint writer copies to the host without blocking.
    `load_scaler_state` reads this form and the plain one. Empty for a disabled scaler (bf16, fp32)."""
    if not scaler.is_enabled():
        return {}
    scale, tracker = scaler._get_scale_async(), scaler._growth_tracker  # None before the first scaled step
    return {"scale": scaler._init_scale if scale is None else scale, "growth_factor": scaler.get_growth_factor(),
            "backoff_factor": scaler.get_backoff_factor(), "growth_interval": scaler.get_growth_interval(),
            "_growth_tracker": scaler._init_growth_tracker if tracker is None else tracker}


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """`GradScaler.load_state_dict` of a `scaler_state` (tensors, read on the host where checkpoints load) or of a
    plain state dict."""
    scaler.load_state_dict({k: v.item() if isinstance(v, torch.Tensor) else v for k, v in state.items()})

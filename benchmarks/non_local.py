"""Benchmark one non-local block, forward + backward: fused attention (SDPA) vs reference (matmul -> softmax ->
matmul, as the original), at NVAN's two shapes for 8-frame 256×128 clips:

    layer2: T·H·W = 8·32·16 = 4,096 tokens, C = 512, d = 256
    layer3: T·H·W = 8·16·8  = 1,024 tokens, C = 1024, d = 512

Usage:
    python -m benchmarks.non_local                            # CUDA when present (batch 32, bf16 autocast)
    python -m benchmarks.non_local --device cpu               # batch 2, fp32
    python -m benchmarks.non_local --device cuda --dtype float32 --batch 16
    python -m benchmarks.non_local --device cpu --batch 1 --clip-len 2   # a quick look (make gpu-check's smoke mode)

--batch is clips per step: 32 on a GPU (the paper's batch), 2 on the CPU by default (a 32-clip reference step
at layer2 takes tens of seconds there). Time: median of --repeats steps after --warmup untimed ones, with a
CUDA synchronise before each timestamp. Peak memory, above what was allocated before the step (input,
parameters): on CUDA, torch.cuda.max_memory_allocated(); on the CPU, the peak of the running sum of the
allocations and frees that torch.profiler(profile_memory=True) records during one step. Backend: the aten
attention kernel the step dispatched to (flash, memory-efficient, cudnn, cpu-fused), recorded by a dispatch mode.
Results: a table on stdout and one JSON line per variant in benchmarks/results/non_local.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import Timer, append_results, device_name, print_table, summarize, versions
from stenvan.models.non_local import NonLocalBlock

SHAPES = {"layer2": (512, 8, 32, 16), "layer3": (1024, 8, 16, 8)}  # (C, T, H, W) of NVAN's NL blocks
KERNELS = {  # aten op -> the SDPA backend it is
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention_for_cpu": "cpu-fused",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SdpaKernels(TorchDispatchMode):
    """Records which SDPA kernel ran (the math fallback decomposes into bmm/softmax and records nothing); the
    GPU tests use it too (tests/test_gpu_path.py)."""

    def __init__(self):
        super().__init__()
        self.kernels: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in KERNELS:
            self.kernels.add(KERNELS[name])
        return func(*args, **(kwargs or {}))


def _free_grads(block, x):
    block.zero_grad(set_to_none=True)
    x.grad = None


def _make_step(block, x, grad_out, frames, device, dtype):
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        _free_grads(block, x)
        with autocast:
            z = block(x, group_frames=frames)  # (B·T, C, H, W); every clip's T frames attend together
        z.backward(grad_out)

    return step


def _peak_bytes(step, device) -> int:
    """Peak memory one step allocates beyond what is already allocated (call with gradients freed)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence kineto's "no GPU" error line on CPU-only machines
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # "[memory]" events carry +bytes for each allocation and -bytes for each free, in time order.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def _max_rel_diff(blocks, x, frames, device, dtype) -> float:
    """Forward agreement of the two attention paths (max-relative), as a sanity column."""
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        fused, reference = (blocks[m](x, group_frames=frames) - x for m in ("fused", "reference"))
    return ((fused.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def measure(shape_name, batch, device, dtype, warmup, repeats, clip_len=None) -> list[dict]:
    channels, frames, height, width = SHAPES[shape_name]
    frames = clip_len or frames
    torch.manual_seed(0)
    fused = NonLocalBlock(channels, attention="fused").to(device)
    torch.nn.init.normal_(fused.bn.weight)  # a non-identity block, so the agreement check means something
    reference = NonLocalBlock(channels, attention="reference").to(device)
    reference.load_state_dict(fused.state_dict())
    blocks = {"fused": fused, "reference": reference}
    x = torch.randn(batch * frames, channels, height, width, device=device, requires_grad=True)
    grad_out = torch.randn_like(x)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    agreement = _max_rel_diff(blocks, x, frames, device, dtype)

    rows = []
    for mode, block in blocks.items():
        step = _make_step(block, x, grad_out, frames, device, dtype)
        for _ in range(warmup):
            step()
        times_s = []
        for _ in range(repeats):
            with Timer(sync) as timer:
                step()
            times_s.append(timer.elapsed_s)
        recorder = SdpaKernels()
        with recorder:
            step()
        _free_grads(block, x)  # the previous step's gradients go before the baseline, not inside the step
        peak_bytes = _peak_bytes(step, device)
        backend = ",".join(sorted(recorder.kernels)) or ("math" if mode == "fused" else "none (explicit matmul)")
        rows.append({"variant": f"{shape_name}/{mode}", "shape": shape_name, "attention": mode,
                     "tokens": frames * height * width, "channels": channels, "head_dim": channels // 2,
                     "batch": batch, "dtype": str(dtype).replace("torch.", ""), "peak_mem_mib": peak_bytes / 2**20,
                     "sdpa_backend": backend,
                     "max_rel_diff_fused_vs_reference": agreement, **summarize(times_s)})
    fused_row, reference_row = rows
    fused_row["speedup_vs_reference"] = reference_row["median_s"] / fused_row["median_s"]
    fused_row["memory_ratio_vs_reference"] = reference_row["peak_mem_mib"] / max(fused_row["peak_mem_mib"], 1e-9)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=None, help="clips per step (default: 32 on cuda, 2 on cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="compute dtype, autocast when not float32 (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--clip-len", type=int, default=8, help="frames per clip: tokens = clip_len·H·W (default 8, "
                                                                   "the paper's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: 20 on cuda, 5 on cpu)")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch.cuda.is_available() is False")
    on_gpu = device.type == "cuda"
    batch = args.batch or (32 if on_gpu else 2)
    dtype = DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    repeats = args.repeats or (20 if on_gpu else 5)
    if batch < 1 or repeats < 1 or args.warmup < 0 or args.clip_len < 1:
        parser.error("--batch, --repeats and --clip-len must be at least 1, --warmup at least 0")

    rows = []
    for shape_name in args.shapes:
        rows += measure(shape_name, batch, device, dtype, args.warmup, repeats, args.clip_len)

    where = device_name(str(device))
    table = [[r["shape"], r["attention"], r["tokens"], r["head_dim"], r["median_s"] * 1e3, r["min_s"] * 1e3,
              r["max_s"] * 1e3, r["peak_mem_mib"], r["sdpa_backend"], r.get("speedup_vs_reference", ""),
              r.get("memory_ratio_vs_reference", "")] for r in rows]
    print_table(["shape", "attention", "tokens", "d", "median_ms", "min_ms", "max_ms", "peak_MiB", "backend",
                 "speedup", "mem_ratio"], table,
                title=f"non-local block fwd+bwd, batch {batch} clips × {args.clip_len} frames, {str(dtype).replace('torch.', '')}"
                      f", {where}, median of {repeats}")
    diffs = ", ".join(f"{r['shape']} {r['max_rel_diff_fused_vs_reference']:.1e}" for r in rows[::2])
    print(f"fused vs reference forward, max relative difference: {diffs}")
    print("peak memory method:", "torch.cuda.max_memory_allocated above the pre-step allocation" if on_gpu else
          "running sum of torch.profiler(profile_memory=True) allocation events during one step")
    layer2 = [r for r in rows if r["shape"] == "layer2" and r["attention"] == "fused"]
    if layer2:
        r = layer2[0]
        verdict = (f"speedup {r['speedup_vs_reference']:.2f}x (target >= 2x), "
                   f"memory {r['memory_ratio_vs_reference']:.2f}x less (target >= 4x)")
        print(f"layer2 target (GPU): {verdict}" + ("" if on_gpu else " — measured on the CPU; targets are for a GPU"))

    if not args.no_save:
        info = {"device": where, "device_type": device.type, "versions": versions(),
                "memory_method": "cuda_max_memory_allocated" if on_gpu else "torch_profiler_memory_events"}
        path = append_results("non_local", [{**info, **r} for r in rows])
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()

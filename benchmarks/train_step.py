"""One training step (forward + loss + backward + Adam), our configuration against the original's.

    python -m benchmarks.train_step --arch nvan [--device cuda] [--batch 32] [--compile]

Model only: clips are random tensors already on the device (the loader is measured by benchmarks.loader).
Variants, measured in the same run after a warm-up:
- original: fp32, reference attention (explicit matmul-softmax-matmul), NCHW, plain Adam (no foreach/fused)
- ours: bf16 autocast, channels_last, fused SDPA attention, fused Adam (foreach on the CPU)
- ours+compile (with --compile): the same under torch.compile
Reports clips/s, frames/s, peak memory, achieved TFLOP/s (FLOPs of one step counted by FlopCounterMode) and
the ratio to the original. The paper's batch is 32 clips x 8 frames of 256x128; the CPU default is smaller.
"""

from __future__ import annotations

import argparse
import gc

import torch

from benchmarks.common import Timer, append_results, device_name, print_table, summarize, versions
from stenvan.losses import ReIDLoss
from stenvan.models import build_model, flop_counter

VARIANTS = {
    "original": {"precision": "fp32", "attention": "reference", "channels_last": False, "fused_adam": False},
    "ours": {"precision": "bf16", "attention": "fused", "channels_last": True, "fused_adam": True},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_step(arch, variant, batch, clip_len, height, width, num_classes, device, compile_model):
    torch.manual_seed(0)
    model = build_model(arch, num_classes, attention=variant["attention"]).to(device)
    if variant["channels_last"]:
        model.to(memory_format=torch.channels_last)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-5,
                                 **(fused if variant["fused_adam"] else {"foreach": False}))
    forward = torch.compile(model) if compile_model else model
    criterion = ReIDLoss()
    clips = torch.randn(batch, clip_len, 3, height, width, device=device)
    labels = torch.arange(batch, device=device) // 4 % num_classes  # K = 4 clips per identity
    autocast = torch.autocast(device.type, dtype=DTYPES[variant["precision"]],
                              enabled=variant["precision"] != "fp32")

    def step():
        with autocast:
            feats, logits = forward(clips)
            loss = criterion(feats, logits, labels)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def measure(args, name, variant, device):
    step, model = make_step(args.arch, variant, args.batch, args.clip_len, args.height, args.width, 625, device,
                            name.endswith("compile"))
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    for _ in range(args.warmup):
        step()
    with flop_counter() as counter:  # FLOPs of one step: forward + backward (optimizer FLOPs are negligible)
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        with Timer(sync) as t:
            step()
        times.append(t.elapsed_s)
    stats = summarize(times)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    del step, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    clips_per_s = args.batch / stats["median_s"]
    return {"variant": name, **variant, "clips_per_s": clips_per_s, "frames_per_s": clips_per_s * args.clip_len,
            "peak_mem_bytes": peak, "step_tflop": flops / 1e12, "achieved_tflops": flops / stats["median_s"] / 1e12,
            **stats}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("baseline", "nvan", "ste_nvan"), default="nvan")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="clips per step (default: 32 on a GPU, 2 on the CPU)")
    parser.add_argument("--clip-len", type=int, default=8)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also measure ours under torch.compile")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.batch = args.batch or (32 if device.type == "cuda" else 2)
    if device.type == "cpu":
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
    variants = dict(VARIANTS)
    if args.compile:
        variants["ours+compile"] = VARIANTS["ours"]
    rows = [measure(args, name, v, device) for name, v in variants.items()]
    base = rows[0]["clips_per_s"]
    dev = device_name(args.device)
    results = []
    for r in rows:
        r["ratio_to_original"] = r["clips_per_s"] / base
        results.append({"arch": args.arch, "device": dev, "versions": versions(), "batch": args.batch,
                        "clip_len": args.clip_len, "height": args.height, "width": args.width, **r})
    print_table(["variant", "clips/s", "frames/s", "peak GiB", "TFLOP/s", "step ms", "vs original"],
                [[r["variant"], r["clips_per_s"], r["frames_per_s"],
                  "n/a" if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30, r["achieved_tflops"],
                  1000 * r["median_s"], r["ratio_to_original"]] for r in rows],
                title=f"train step, {args.arch}, {args.batch} clips x {args.clip_len} x {args.height}x{args.width}, "
                      f"{dev}")
    print(f"results appended to {append_results('train_step', results)}")


if __name__ == "__main__":
    main()

"""One training step (forward + loss + backward + Adam), our configuration against the original's; the cost of
synchronised BatchNorm; and the share of wall time training waits for checkpoints.

    python -m benchmarks.train_step --arch nvan [--device cuda] [--batch 32] [--compile] [--no-checkpoint]
        [--variants original ours ours+sync_bn ours+sync_bn_plain ours+compile] [--no-save]

Model only: clips are random tensors already on the device (the loader is measured by benchmarks.loader).
Variants, measured in the same run after a warm-up:
- original: fp32, reference attention (explicit matmul-softmax-matmul), NCHW, plain Adam (no foreach/fused)
- ours: bf16 autocast, channels_last, fused SDPA attention, fused Adam (as the trainer)
- ours+compile (with --compile): the same under torch.compile
- ours+sync_bn: ours with every BatchNorm synchronised (stenvan.models.sync_batchnorm, what `sync_bn` does with
  several processes) in a one-process group (gloo on the CPU, NCCL on a GPU): the per-layer statistics exchange,
  combination and backward all-reduce, without the other ranks (their communication is not measured here)
- ours+sync_bn_plain (GPU only, by default): the same with plain torch ops instead of the fused CUDA kernels (the
  CPU's path), to show what the kernels buy
Reports clips/s, frames/s, peak memory, achieved TFLOP/s (FLOPs of one step counted by FlopCounterMode), the
ratio to the original and to ours (the cost of synchronised BatchNorm). The paper's batch is 32 clips x 8 frames
of 256x128; the CPU default is smaller.

Checkpoints (unless --no-checkpoint): the STE-NVAN preset's model (ours; fp32 on the CPU) trains `--ckpt-steps`
steps with a full checkpoint (model + Adam state + RNG, as the trainer writes) every `--ckpt-every` steps, once
through the background writer (stenvan.training.checkpoint_writer) and once writing on the training thread (what
the trainer did before). Reported: the seconds the training thread waited for checkpoints, as a share of the run's
wall time (the background writer's last write, finished after the loop, is reported apart as `final_flush_s`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import tempfile
import time

import torch

from benchmarks.common import Timer, append_results, device_name, print_table, summarize, versions
from stenvan.checkpoint import save_checkpoint
from stenvan.training.checkpoint_writer import CheckpointWriter
from stenvan.training.losses import ReIDLoss
from stenvan.models import build_model, flop_counter
from stenvan.models.sync_batchnorm import convert_sync_batchnorm
from stenvan.training.optim import build_optimizer
from stenvan.training.rng import rng_state

VARIANTS = {
    "original": {"precision": "fp32", "attention": "reference", "channels_last": False, "fused_adam": False},
    "ours": {"precision": "bf16", "attention": "fused", "channels_last": True, "fused_adam": True},
    "ours+sync_bn": {"precision": "bf16", "attention": "fused", "channels_last": True, "fused_adam": True,
                     "sync_bn": "fused on GPUs"},
    "ours+sync_bn_plain": {"precision": "bf16", "attention": "fused", "channels_last": True, "fused_adam": True,
                           "sync_bn": "plain ops"},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_step(arch, variant, batch, clip_len, height, width, num_classes, device, compile_model, stripes=None):
    torch.manual_seed(0)
    model = build_model(arch, num_classes, attention=variant["attention"],
                        stripes=stripes if arch == "ste_nvan" else None)
    if variant.get("sync_bn"):  # needs a process group: see one_process_group
        model = convert_sync_batchnorm(model, fused=False if variant["sync_bn"] == "plain ops" else None)
    model = model.to(device)
    if variant["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if variant["fused_adam"]:
        optimizer = build_optimizer(list(model.parameters()), "adam", lr=1e-4, weight_decay=5e-5)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-5, foreach=False)
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

    return step, model, optimizer


@contextlib.contextmanager
def one_process_group(device: torch.device, needed: bool):
    """A process group of one (gloo on the CPU, NCCL on a GPU) for the sync_bn variants: with it, synchronised
    BatchNorm runs its whole path (all-gather, combination, backward all-reduce) as it does with several ranks."""
    import torch.distributed as dist

    if not needed or dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device if cuda else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def step_flops(args, variant, device) -> float:
    """FLOPs of one eager step, forward + backward (optimizer FLOPs are negligible). A compiled step computes the
    same, but FlopCounterMode sees nothing inside compiled code (and may make it recompile): count it eagerly."""
    step, model, _ = make_step(args.arch, variant, args.batch, args.clip_len, args.height, args.width, 625, device,
                               False, args.stripes)
    with flop_counter() as counter:
        step()
    del step, model
    gc.collect()
    return counter.get_total_flops()


def measure(args, name, variant, device):
    compiled = name.endswith("compile")
    flops = step_flops(args, variant, device) if compiled else None
    step, model, _ = make_step(args.arch, variant, args.batch, args.clip_len, args.height, args.width, 625, device,
                               compiled, args.stripes)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    for _ in range(args.warmup):  # a compiled step compiles here
        step()
    if flops is None:
        with flop_counter() as counter:  # counted on a step that also warms up
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


def measure_checkpoints(args, device, background: bool) -> dict:
    """STE-NVAN (ours) for `ckpt_steps` steps, a checkpoint every `ckpt_every`: seconds the training waits."""
    # fp32 on the CPU: oneDNN's bf16 convolutions there return non-finite values now and then at small sizes, and
    # a state with non-finite weights is never written (stenvan.training.checkpoint_writer); the checkpoint (fp32
    # weights and Adam state) is the same size either way.
    variant = VARIANTS["ours"] if device.type == "cuda" else {**VARIANTS["ours"], "precision": "fp32"}
    step, model, optimizer = make_step("ste_nvan", variant, args.batch, args.clip_len, args.height, args.width, 625,
                                       device, False, args.stripes)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    step()  # warm-up (allocations, cuDNN autotuning)
    with tempfile.TemporaryDirectory(dir=args.ckpt_dir, prefix="bench-ckpt-") as run_dir:
        writer = CheckpointWriter(run_dir, keep=2, log=lambda _: None)
        blocked_s = 0.0
        with Timer(sync) as run:
            for i in range(1, args.ckpt_steps + 1):
                step()
                if i % args.ckpt_every == 0:
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "rng": rng_state(), "progress": {"global_step": i}}
                    if background:
                        writer.save(state, step=i)
                    else:  # on the training thread: write, sync, read back, rename
                        start = time.perf_counter()
                        save_checkpoint(state, run_dir, i, keep=2)
                        blocked_s += time.perf_counter() - start
        waited_s = writer.wait_s if background else blocked_s
        with Timer() as flush:
            writer.wait()
        size = os.path.getsize(os.path.join(run_dir, "last.pt"))
    del step, model, optimizer
    gc.collect()
    return {"variant": "checkpoints " + ("in the background" if background else "on the training thread"),
            "arch": "ste_nvan", "batch": args.batch, "steps": args.ckpt_steps, "ckpt_every": args.ckpt_every,
            "checkpoints": args.ckpt_steps // args.ckpt_every, "ckpt_mb": size / 1e6, "wall_s": run.elapsed_s,
            "ckpt_wait_s": waited_s, "ckpt_wait_share": waited_s / run.elapsed_s,
            "final_flush_s": flush.elapsed_s if background else 0.0}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("baseline", "nvan", "ste_nvan"), default="nvan")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="clips per step (default: 32 on a GPU, 2 on the CPU)")
    parser.add_argument("--clip-len", type=int, default=8)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--stripes", type=int, help="STE-NVAN stripes (default 16, the paper's; must divide height/16)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also measure ours under torch.compile")
    parser.add_argument("--variants", nargs="+", choices=("original", "ours", "ours+sync_bn", "ours+sync_bn_plain",
                                                          "ours+compile"),
                        help="measure only these (default: original, ours, ours+sync_bn, on a GPU also "
                             "ours+sync_bn_plain, plus ours+compile with --compile); ratios need `original` and "
                             "`ours` among them")
    parser.add_argument("--no-save", action="store_true", help="do not append to the results (e.g. a warm-up run)")
    parser.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint-wait measurement")
    parser.add_argument("--ckpt-steps", type=int, help="steps of the checkpoint run (default: 12 GPU, 6 CPU)")
    parser.add_argument("--ckpt-every", type=int, default=3, help="steps between checkpoints in that run")
    parser.add_argument("--ckpt-dir", help="where the checkpoints go (default: the system's temp folder)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.batch = args.batch or (32 if device.type == "cuda" else 2)
    args.ckpt_steps = args.ckpt_steps or (12 if device.type == "cuda" else 6)
    if device.type == "cpu":
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
    variants = dict(VARIANTS)
    if device.type != "cuda":  # the same path as ours+sync_bn on the CPU
        del variants["ours+sync_bn_plain"]
    if args.compile:
        variants["ours+compile"] = VARIANTS["ours"]
    if args.variants:
        variants = {name: VARIANTS.get(name, VARIANTS["ours"]) for name in args.variants}
    with one_process_group(device, any(v.get("sync_bn") for v in variants.values())):
        rows = [measure(args, name, v, device) for name, v in variants.items()]
    by_name = {r["variant"]: r["clips_per_s"] for r in rows}
    dev = device_name(args.device)
    results = []
    for r in rows:
        r["ratio_to_original"] = r["clips_per_s"] / by_name["original"] if "original" in by_name else None
        r["ratio_to_ours"] = r["clips_per_s"] / by_name["ours"] if "ours" in by_name else None
        results.append({"arch": args.arch, "device": dev, "versions": versions(), "batch": args.batch,
                        "clip_len": args.clip_len, "height": args.height, "width": args.width, **r})
    print_table(["variant", "clips/s", "frames/s", "peak GiB", "TFLOP/s", "step ms", "vs original", "vs ours"],
                [[r["variant"], r["clips_per_s"], r["frames_per_s"],
                  "n/a" if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30, r["achieved_tflops"],
                  1000 * r["median_s"], r["ratio_to_original"] or "-", r["ratio_to_ours"] or "-"] for r in rows],
                title=f"train step, {args.arch}, {args.batch} clips x {args.clip_len} x {args.height}x{args.width}, "
                      f"{dev}")
    if not args.no_checkpoint:
        ckpt = [measure_checkpoints(args, device, background) for background in (True, False)]
        print_table(["variant", "checkpoints", "MB each", "wall s", "waited s", "wait share", "final flush s"],
                    [[r["variant"], r["checkpoints"], r["ckpt_mb"], r["wall_s"], r["ckpt_wait_s"],
                      f"{100 * r['ckpt_wait_share']:.2f}%", r["final_flush_s"]] for r in ckpt],
                    title=f"checkpoint wait, ste_nvan (ours), {args.ckpt_steps} steps of {args.batch} clips, a "
                          f"checkpoint every {args.ckpt_every}, {dev}")
        results += [{"device": dev, "versions": versions(), **r} for r in ckpt]
    if args.no_save:
        print("not saved (--no-save)")
        return
    print(f"results appended to {append_results('train_step', results)}")


if __name__ == "__main__":
    main()

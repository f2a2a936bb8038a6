"""Feature-extraction throughput and the projected time for the full MARS test set in dense mode.

    python -m benchmarks.eval [--arch ste_nvan] [--device cuda] [--batch 64] [--data shards/mars --loader dali]

Model: clips of random data already on the device, eval mode, our precision (bf16 on a GPU) vs fp32, after a
warm-up. With --data, also the end-to-end extraction of the gallery split in dense mode through the real eval
loader. The projection is 681,089 frames (every MARS test frame, dense mode) at the measured rate.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Timer, append_results, device_name, print_table, summarize, versions
from stenvan.models import build_model

MARS_TEST_FRAMES = 681_089


@torch.no_grad()
def model_rate(arch, device, precision, batch, clip_len, height, width, warmup, repeats, stripes=None) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, 625, stripes=stripes).to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    clips = torch.randn(batch, clip_len, 3, height, width, device=device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
        for _ in range(warmup):
            model(clips)
        times = []
        for _ in range(repeats):
            with Timer(sync) as t:
                model(clips)
            times.append(t.elapsed_s)
    stats = summarize(times)
    return {"frames_per_s": batch * clip_len / stats["median_s"], **stats}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("baseline", "nvan", "ste_nvan"), default="ste_nvan")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="clips per forward (default 64 on a GPU, 4 on the CPU)")
    parser.add_argument("--clip-len", type=int, default=8)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--stripes", type=int, help="STE-NVAN stripes (default 16, the paper's; must divide height/16)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--data", help="prepared shards: also measure end-to-end dense extraction of the gallery")
    parser.add_argument("--loader", choices=("dali", "torch"), default="dali")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 4)
    warmup, repeats = (3, args.repeats) if device.type == "cuda" else (1, min(args.repeats, 3))
    ours = "bf16" if device.type == "cuda" else "fp32"
    variants = {"model fp32": "fp32"} if ours == "fp32" else {"model fp32": "fp32", "model bf16 (ours)": "bf16"}
    rows = []
    for name, precision in variants.items():
        r = model_rate(args.arch, device, precision, batch, args.clip_len, args.height, args.width, warmup, repeats,
                       args.stripes if args.arch == "ste_nvan" else None)
        rows.append({"variant": name, "precision": precision, **r})
    if args.data:
        from stenvan.evaluation.evaluate import extract_split

        torch.manual_seed(0)
        model = build_model(args.arch, 625, stripes=args.stripes if args.arch == "ste_nvan" else None).to(device)
        _, stats = extract_split(model, args.data, "gallery", mode="dense", clip_len=args.clip_len, height=args.height,
                                 width=args.width, device=device, precision=ours, loader=args.loader,
                                 workers=args.workers, batch_size=batch, progress=False)
        rows.append({"variant": f"end-to-end dense ({args.loader})", "precision": ours, **stats})
    dev = device_name(args.device)
    for r in rows:
        r["projected_mars_dense_s"] = MARS_TEST_FRAMES / r["frames_per_s"]
    print_table(["variant", "frames/s", "projected MARS dense (min)"],
                [[r["variant"], r["frames_per_s"], r["projected_mars_dense_s"] / 60] for r in rows],
                title=f"feature extraction, {args.arch}, {batch} clips x {args.clip_len} x {args.height}x{args.width}, "
                      f"{dev}")
    results = [{"arch": args.arch, "device": dev, "versions": versions(), "batch": batch, **r} for r in rows]
    print(f"results appended to {append_results('eval', results)}")


if __name__ == "__main__":
    main()

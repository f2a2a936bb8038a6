"""Evaluate a checkpoint on prepared shards under the official, standard and torchreid protocols.

    python eval.py --checkpoint runs/ste_mars/last.pt --data shards/mars [--mode paper|dense] [--out DIR]
    python eval.py --checkpoint STE_NVAN.pth --original-arch ste_nvan --data shards/mars   # released models
    python eval.py --checkpoint runs/demo/last.pt --data shards/mars --untrained            # same model, initial weights

Writes metrics.json, features.npz, cmc.png and ranked_list.png to --out (default: <checkpoint dir>/eval-<mode>,
with -untrained appended for --untrained).
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="prepared shard folder")
    parser.add_argument("--mode", choices=("paper", "dense"), default="paper")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    parser.add_argument("--original-arch", choices=("baseline", "nvan", "ste_nvan"),
                        help="the checkpoint is one released by the original STE-NVAN project, of this model")
    parser.add_argument("--untrained", action="store_true", help="evaluate the run's model at its initial weights")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    parser.add_argument("--loader", choices=("dali", "torch"), default="dali")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--clip-len", type=int, help="frames per clip (default: the checkpoint's; 8 for originals)")
    parser.add_argument("--height", type=int, help="input height (default: the checkpoint's; 256 for originals)")
    parser.add_argument("--width", type=int, help="input width (default: the checkpoint's; 128 for originals)")
    parser.add_argument("--summary", help="also merge the metrics into this JSON file under --label")
    parser.add_argument("--label", default="eval", help="key of this evaluation in --summary (e.g. trained)")
    args = parser.parse_args(argv)

    from stenvan.amp import resolve_precision
    from stenvan.checkpoint import CheckpointError
    from stenvan.distributed import DeviceError, describe
    from stenvan.evaluate import evaluate_model, load_model_for_eval, write_outputs
    from stenvan.evaluation import format_table
    from stenvan.shards import ShardFormatError

    try:
        device = describe(args.device).device
        precision = resolve_precision(args.precision, device)
        model, settings = load_model_for_eval(args.checkpoint, args.original_arch, args.untrained)
        model.to(device)
        settings.update({k: v for k, v in (("clip_len", args.clip_len), ("height", args.height),
                                           ("width", args.width)) if v is not None})
        model.check_clip_length(settings["clip_len"])
        results, features, records, origin, stats = evaluate_model(
            model, args.data, mode=args.mode, clip_len=settings["clip_len"], height=settings["height"],
            width=settings["width"], device=device, precision=precision, loader=args.loader, workers=args.workers,
            batch_size=args.batch_size, metric=args.metric, return_features=True)
    except (CheckpointError, ShardFormatError, DeviceError, ValueError, ImportError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    default_out = f"eval-{args.mode}" + ("-untrained" if args.untrained else "")
    out = Path(args.out or Path(args.checkpoint).parent / default_out)
    extra = {"checkpoint": str(args.checkpoint), "model": settings["source"], "arch": settings["arch"],
             "mode": args.mode, "metric": args.metric, "data": str(args.data), "feature_frames_per_s":
             stats["frames_per_s"]}
    metrics = write_outputs(out, results, features, records, origin, args.data, args.metric, extra)
    if args.summary:
        merge_summary(args.summary, args.label, metrics)
    print(format_table(results))
    print(f"features: {stats['frames']:,} frames at {stats['frames_per_s']:,.0f} frames/s; outputs in {out}")
    return 0


def merge_summary(path: str, label: str, metrics: dict) -> None:
    """Read-modify-write the summary JSON atomically, e.g. runs/demo/metrics.json {"untrained": ..., "trained": ...}."""
    import json

    from stenvan.shards import atomic_write

    summary = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    summary[label] = metrics
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())

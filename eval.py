"""Evaluate a checkpoint on prepared shards under the official, standard and torchreid protocols.

    python eval.py --checkpoint runs/ste_mars/last.pt --data shards/mars [--mode paper|dense] [--out DIR]
    python eval.py --checkpoint STE_NVAN.pth --original-arch ste_nvan --data shards/mars   # released models
    python eval.py --checkpoint runs/demo/last.pt --data shards/mars --untrained            # same model, initial weights
    python eval.py --checkpoint runs/ste_mars/last.pt --data shards/mars --rerank   # + k-reciprocal re-ranked results

Writes metrics.json, features.npz, cmc.png and ranked_list.png to --out (default: <checkpoint dir>/eval-<mode>,
with -untrained appended for --untrained). --rerank adds `official_rerank`, `standard_rerank` and
`torchreid_rerank` (k-reciprocal re-ranking, Zhong et al. 2017) next to the plain results, never in their place.
The outputs are written together (each to a temp file first, then all renamed into place): a full disk or a
read-only --out ends in one line naming the file (exit 2) and leaves the folder as it was. A checkpoint without
its .sha256 loads with a one-line warning (nothing can check its bytes). --out and --summary are checked before
any work (stenvan.outputs): --out must be new, empty or an earlier evaluation (replaced only with --force), never
an input or a folder holding anything else; --summary must be new or an earlier summary, which gets this
evaluation under --label.
"""

import argparse
import sys
import time
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
    parser.add_argument("--rerank", action="store_true",
                        help="also report k-reciprocal re-ranked results (<protocol>_rerank) beside the plain ones")
    parser.add_argument("--rerank-k1", type=int, default=20, help="re-ranking: k1 (k-reciprocal neighbours)")
    parser.add_argument("--rerank-k2", type=int, default=6, help="re-ranking: k2 (local query expansion)")
    parser.add_argument("--rerank-lambda", type=float, default=0.3, help="re-ranking: weight of the original distance")
    parser.add_argument("--summary", help="also merge the metrics into this JSON file under --label")
    parser.add_argument("--label", default="eval", help="key of this evaluation in --summary (e.g. trained)")
    parser.add_argument("--force", action="store_true", help="replace an earlier evaluation's outputs in --out")
    args = parser.parse_args(argv)
    if args.rerank and (args.rerank_k1 < 1 or args.rerank_k2 < 1 or not 0 <= args.rerank_lambda <= 1):
        print(f"eval: error: --rerank needs k1 >= 1, k2 >= 1 and 0 <= lambda <= 1 (got {args.rerank_k1}, "
              f"{args.rerank_k2}, {args.rerank_lambda})", file=sys.stderr)
        return 2

    from stenvan.amp import resolve_precision
    from stenvan.checkpoint import CheckpointError
    from stenvan.distributed import DeviceError, describe
    from stenvan.errors import error_line
    from stenvan.evaluate import evaluate_model, load_model_for_eval, with_rerank, write_outputs
    from stenvan.evaluation import format_table
    from stenvan.outputs import EVAL_FOLDER, EVAL_SUMMARY, check_output
    from stenvan.shards import ShardFormatError

    default_out = f"eval-{args.mode}" + ("-untrained" if args.untrained else "")
    out = Path(args.out or Path(args.checkpoint).parent / default_out)
    created = not out.exists()
    try:
        # Before any work: the outputs never replace an input, nor anything but an earlier evaluation.
        inputs = {"--checkpoint": args.checkpoint, "--data": args.data}
        check_output(out, EVAL_FOLDER, inputs, args.force, command="eval.py")
        if args.summary:
            check_output(args.summary, EVAL_SUMMARY, {**inputs, "--out": out}, option="--summary", command="eval.py")
        device = describe(args.device).device
        precision = resolve_precision(args.precision, device)
        model, settings = load_model_for_eval(args.checkpoint, args.original_arch, args.untrained)
        # The output folder before the features: a path that cannot take the outputs fails now, not after them.
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out}: exists and is not a folder; --out names the output folder")
        out.mkdir(parents=True, exist_ok=True)
        model.to(device)
        settings.update({k: v for k, v in (("clip_len", args.clip_len), ("height", args.height),
                                           ("width", args.width)) if v is not None})
        model.check_clip_length(settings["clip_len"])
        results, features, records, origin, stats = evaluate_model(
            model, args.data, mode=args.mode, clip_len=settings["clip_len"], height=settings["height"],
            width=settings["width"], device=device, precision=precision, loader=args.loader, workers=args.workers,
            batch_size=args.batch_size, metric=args.metric, return_features=True)
        if args.rerank:
            start = time.perf_counter()
            results = with_rerank(results, features, records, args.metric, k1=args.rerank_k1, k2=args.rerank_k2,
                                  lambda_value=args.rerank_lambda)
            rerank = {"k1": args.rerank_k1, "k2": args.rerank_k2, "lambda": args.rerank_lambda,
                      "seconds": time.perf_counter() - start}
        extra = {"checkpoint": str(args.checkpoint), "model": settings["source"], "arch": settings["arch"],
                 "mode": args.mode, "metric": args.metric, "data": str(args.data), "feature_frames_per_s":
                 stats["frames_per_s"]}
        if args.rerank:
            extra["rerank_params"] = rerank
        metrics = write_outputs(out, results, features, records, origin, args.data, args.metric, extra)
        if args.summary:
            merge_summary(args.summary, args.label, metrics)
    except (CheckpointError, ShardFormatError, DeviceError, ValueError, ImportError, OSError) as e:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the folder this run made for outputs it never wrote
        print(f"eval: error: {error_line(e, 'rerun')}", file=sys.stderr)
        return 2
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

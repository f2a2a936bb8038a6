"""Evaluate a checkpoint on prepared shards under the dataset's protocols.

    python eval.py --checkpoint runs/ste_mars/last.pt --data shards/mars [--mode paper|dense] [--out DIR]
    python eval.py --checkpoint runs/ilids/split-3/last.pt --data shards/ilidsvid --split 3   # a person split
    python eval.py --checkpoint runs/lsvid/last.pt --data shards/lsvid [--split val]        # LS-VID's val set
    python eval.py --checkpoint STE_NVAN.pth --original-arch ste_nvan --data shards/mars   # released models
    python eval.py --checkpoint runs/demo/last.pt --data shards/mars --untrained            # same model, initial weights
    python eval.py --checkpoint runs/ste_mars/last.pt --data shards/mars --rerank   # + k-reciprocal re-ranked results

Protocols: MARS and DukeV `official`, `standard`, `torchreid`; iLIDS-VID and PRID-2011 `cross_camera` (queries =
camera 1 of the split's test persons, gallery = their camera 2; --split N is required); LS-VID `sinet` (gallery =
test minus queries) and `bicnet` (gallery = every test tracklet), or `bicnet` alone on its val set.
A model is never scored on identities it was trained on: another person split of the dataset it trained on is
refused (exit 2); a model trained on another dataset is evaluated and labelled `cross_dataset` in metrics.json.
Writes metrics.json, features.npz, cmc.png and ranked_list.png to --out (default: <checkpoint dir>/eval-<mode>,
with -split<N> / -val and -untrained appended). --rerank adds `<protocol>_rerank` (k-reciprocal re-ranking, Zhong
et al. 2017) next to each plain result, never in its place.
The outputs are written together (each to a temp file first, then all renamed into place): a full disk or a
read-only --out ends in one line naming the file (exit 2) and leaves the folder as it was. A checkpoint without
its .sha256 loads with a one-line warning (nothing can check its bytes). --out and --summary are checked before
any work (stenvan.outputs): --out must be new, empty or an earlier evaluation (replaced only with --force), never
an input or a folder holding anything else; --summary must be new or an earlier summary, which gets this
evaluation under --label.
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="prepared shard folder")
    parser.add_argument("--mode", choices=("paper", "dense"), default="paper")
    parser.add_argument("--split", help="iLIDS-VID, PRID-2011: the person split 0..9 to score (its test persons); "
                                        "LS-VID: 'val' for its val set instead of the test set")
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

    from stenvan.checkpoint import CheckpointError
    from stenvan.distributed import DeviceError
    from stenvan.errors import error_line
    from stenvan.evaluation import format_table
    from stenvan.evaluation.run import default_out, evaluate_checkpoint
    from stenvan.outputs import EVAL_SUMMARY, check_output
    from stenvan.person_splits import parse_split
    from stenvan.shards import ShardFormatError

    out, created = None, False
    try:
        split = parse_split(args.split)
        out = Path(args.out) if args.out else default_out(args.checkpoint, args.mode, split, args.untrained)
        created = not out.exists()
        if args.summary:  # before any work, as --out (which evaluate_checkpoint checks first)
            check_output(args.summary, EVAL_SUMMARY, {"--checkpoint": args.checkpoint, "--data": args.data,
                                                      "--out": out}, option="--summary", command="eval.py")
        rerank = {"k1": args.rerank_k1, "k2": args.rerank_k2, "lambda": args.rerank_lambda} if args.rerank else None
        results, metrics, stats = evaluate_checkpoint(
            args.checkpoint, args.data, out, split=split, mode=args.mode, device=args.device, precision=args.precision,
            loader=args.loader, workers=args.workers, batch_size=args.batch_size, metric=args.metric,
            original_arch=args.original_arch, untrained=args.untrained, clip_len=args.clip_len, height=args.height,
            width=args.width, rerank=rerank, force=args.force)
        if args.summary:
            merge_summary(args.summary, args.label, metrics)
    except (CheckpointError, ShardFormatError, DeviceError, ValueError, ImportError, OSError) as e:
        if created and out is not None and out.is_dir() and not any(out.iterdir()):
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

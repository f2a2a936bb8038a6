"""The 10-split protocol of iLIDS-VID and PRID-2011 in one command: train and evaluate every person split in turn,
then the mean ± standard deviation over the splits (what papers report).

    python -m stenvan.splits --config configs/ste_nvan_ilidsvid.yaml --data shards/ilidsvid --out runs/ilids
    torchrun --nproc_per_node=4 -m stenvan.splits --config configs/ste_nvan_prid2011.yaml --data shards/prid2011 \\
        --out runs/prid [--splits 0-9] [--mode paper|dense] [--lr 3e-4 ...any train config key]

Each split N is an ordinary run: OUT/split-N/ (train.py's run folder, trained with --split N) and its evaluation
OUT/split-N/eval-<mode>/ (eval.py's outputs, on split N's test persons). The summary, OUT/splits.json and the
table printed at the end, holds every split's metrics and their mean and standard deviation (ddof 1) per protocol.
Kill it at any point and rerun the same command: a split whose metrics.json exists is done and skipped, the split
that was running resumes from its newest checkpoint (`--resume auto`), at the step where it stopped. Under torchrun
every rank trains every split; rank 0 evaluates (the others wait for it at the next split's start) and writes
the summary. Exit codes as train.py's: 0 done or stopped by a signal (rerun to continue), 2 an error, 3
non-finite losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from stenvan.evaluation.protocols import RANKS
from stenvan.person_splits import name_of
from stenvan.shards import NUM_PERSON_SPLITS, PERSON_SPLIT_DATASETS, atomic_write, dump_json, load_manifest

SUMMARY = "splits.json"
METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP")


def parse_splits(text: str) -> list[int]:
    """'0-9', '0,3,5', '2' -> split numbers, ascending."""
    chosen = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            chosen.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"--splits {text!r}: give numbers and ranges such as 0-9 or 0,3,5") from None
    if not chosen or min(chosen) < 0 or max(chosen) >= NUM_PERSON_SPLITS:
        raise ValueError(f"--splits {text!r}: person splits are numbered 0..{NUM_PERSON_SPLITS - 1}")
    return sorted(chosen)


def split_metrics(out: Path, split: int, mode: str) -> Path:
    return out / f"split-{split}" / f"eval-{mode}" / "metrics.json"


def finished_split(out: Path, split: int, mode: str) -> dict | None:
    """The metrics of split `split` if its evaluation was written (by this runner or eval.py), else None."""
    path = split_metrics(out, split, mode)
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("split") == split else None


def summarize(per_split: dict[int, dict], protocols: list[str]) -> tuple[dict, dict]:
    """(mean, std) per protocol and metric over the splits; std with ddof 1 (0 for a single split)."""
    mean, std = {}, {}
    for protocol in protocols:
        values = {m: np.array([per_split[s][protocol][m] for s in sorted(per_split)], dtype=float) for m in METRICS}
        mean[protocol] = {m: float(v.mean()) for m, v in values.items()}
        std[protocol] = {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()}
    return mean, std


def format_summary(dataset: str, splits: list[int], mode: str, mean: dict, std: dict) -> str:
    lines = [f"{name_of(dataset)}: mean ± std over {len(splits)} person splits ({', '.join(map(str, splits))}), "
             f"{mode} mode, in %"]
    lines.append(f"{'protocol':<14}" + "".join(f"{f'rank-{k}':>12}     " for k in RANKS) + f"{'mAP':>12}")
    for protocol in mean:
        cells = "".join(f"{100 * mean[protocol][m]:>9.2f} ± {100 * std[protocol][m]:<5.2f}" for m in METRICS)
        lines.append(f"{protocol:<14}{cells}")
    return "\n".join(lines)


def write_summary(out: Path, manifest: dict, data: str, mode: str, per_split: dict[int, dict]) -> str:
    protocols = [k for k, v in per_split[min(per_split)].items() if isinstance(v, dict) and "mAP" in v]
    mean, std = summarize(per_split, protocols)
    summary = {"dataset": manifest["dataset"], "data": str(data), "mode": mode, "splits": sorted(per_split),
               "person_splits_source": manifest["person_splits_source"], "mean": mean, "std": std,
               "per_split": {str(s): {**{p: per_split[s][p] for p in protocols},
                                      "checkpoint": per_split[s]["checkpoint"]} for s in sorted(per_split)}}
    atomic_write(out / SUMMARY, dump_json(summary))
    return format_summary(manifest["dataset"], sorted(per_split), mode, mean, std)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stenvan.splits", description=__doc__.split("\n")[0],
                                     epilog="Other --key value pairs override train config fields.")
    parser.add_argument("--config", help="YAML preset, e.g. configs/ste_nvan_ilidsvid.yaml")
    parser.add_argument("--data", required=True, help="prepared iLIDS-VID or PRID-2011 shard folder")
    parser.add_argument("--out", required=True, help="folder for the runs (split-N/) and splits.json")
    parser.add_argument("--splits", default=f"0-{NUM_PERSON_SPLITS - 1}", help="which person splits (default all)")
    parser.add_argument("--mode", choices=("paper", "dense"), default="paper", help="test-time sampling (eval.py)")
    return parser


def run(argv: list[str] | None = None) -> int:
    from stenvan.config import load_config
    from stenvan.distributed import describe
    from stenvan.evaluation.run import evaluate_checkpoint
    from stenvan.trainer import Trainer

    args, overrides = _parser().parse_known_args(argv)
    out = Path(args.out)
    manifest = load_manifest(args.data)
    if manifest["dataset"] not in PERSON_SPLIT_DATASETS:
        raise ValueError(f"{args.data}: {name_of(manifest['dataset'])} has no person splits; this runner is for "
                         "iLIDS-VID and PRID-2011 (train other datasets with train.py)")
    splits = parse_splits(args.splits)
    base = load_config(args.config, overrides, data=args.data, out=str(out / "split-0"))
    world = describe(base.device)
    for split in splits:
        if finished_split(out, split, args.mode) is not None:
            if world.is_main:
                print(f"splits: split {split} is done ({split_metrics(out, split, args.mode)}); skipped", flush=True)
            continue
        cfg = dataclasses.replace(base, split=split, out=str(out / f"split-{split}")).validate()
        if world.is_main:
            print(f"splits: split {split}: training in {cfg.out}", flush=True)
        trainer = Trainer(cfg, resume="auto")  # its newest checkpoint, if an earlier run was stopped
        try:
            progress = trainer.fit()
        finally:
            trainer.close()
        if progress.epoch < cfg.epochs and not (cfg.max_steps and progress.global_step >= cfg.max_steps):
            if world.is_main:
                print(f"splits: stopped during split {split}; rerun the same command to continue there", flush=True)
            return 0
        if world.is_main:  # the other ranks go on to the next split and wait for rank 0 there
            evaluate_checkpoint(str(out / f"split-{split}" / "last.pt"), args.data,
                                split_metrics(out, split, args.mode).parent, split=split, mode=args.mode,
                                device=cfg.device, precision=cfg.precision, loader=cfg.loader, workers=cfg.workers)
    if not world.is_main:
        return 0
    per_split = {s: finished_split(out, s, args.mode) for s in splits}
    print(write_summary(out, manifest, args.data, args.mode, per_split))
    print(f"splits: every split's outputs in {out}/split-N/, the summary in {out / SUMMARY}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from stenvan.checkpoint import CheckpointError
    from stenvan.errors import error_line
    from stenvan.failures import RankFailed
    from stenvan.lock import LockError
    from stenvan.resume import RankZeroError
    from stenvan.run_folder import RunFolderError
    from stenvan.shards import ShardFormatError
    from stenvan.trainer import TrainingStopped

    try:
        return run(argv)
    except TrainingStopped as e:
        print(f"splits: stopped: {e}", file=sys.stderr)
        return 3
    except (ValueError, CheckpointError, ShardFormatError, LockError, RunFolderError, RankZeroError, RankFailed,
            FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        print(f"splits: error: {error_line(e, 'rerun the same command')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

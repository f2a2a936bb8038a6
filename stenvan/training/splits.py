"""The 10-split protocol of iLIDS-VID and PRID-2011 in one command: train and evaluate every person split in turn,
then the mean ± standard deviation over the splits (what papers report).

    python train.py --config configs/ste_nvan_ilidsvid.yaml --data shards/ilidsvid --out runs/ilids --split all
    torchrun --nproc_per_node=4 train.py --config configs/ste_nvan_prid2011.yaml --data shards/prid2011 \\
        --out runs/prid --split all      # or --split 0-4 / 0,3,5; --eval_mode dense; any other config key

Each split N is an ordinary run: OUT/split-N/ (train.py's run folder, trained with --split N) and its evaluation
OUT/split-N/eval-<eval_mode>/ (eval.py's outputs, on split N's test persons). The summary, OUT/splits.json and the
table printed at the end, holds every split's metrics and their mean and standard deviation (ddof 1) per protocol.
Kill it at any point and rerun the same command: a split whose metrics.json exists is done and skipped, the split
that was running resumes from its newest checkpoint (`--resume auto`), at the step where it stopped. Under torchrun
every rank trains every split; rank 0 evaluates (the others wait for it at the next split's start) and writes
the summary. Exit codes as train.py's: 0 done or stopped by a signal (rerun to continue), 2 an error, 3
non-finite losses or gradients. Under `torchrun --max-restarts` a restarted attempt reruns the runner, which skips
the finished splits and resumes the one that was running (its store keys under the attempt's, stenvan.distributed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from stenvan.config import TrainConfig
from stenvan.errors import error_line
from stenvan.evaluation.protocols import RANKS
from stenvan.person_splits import name_of
from stenvan.shards import NUM_PERSON_SPLITS, PERSON_SPLIT_DATASETS, atomic_write, dump_json, load_manifest

SUMMARY = "splits.json"
METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP")


def parse_splits(text: str) -> list[int]:
    """'all', '0-9', '0,3,5', '2' -> split numbers, ascending."""
    if text.strip() == "all":
        return list(range(NUM_PERSON_SPLITS))
    chosen = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            chosen.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"--split {text!r}: give numbers and ranges such as 0-9 or 0,3,5") from None
    if not chosen or min(chosen) < 0 or max(chosen) >= NUM_PERSON_SPLITS:
        raise ValueError(f"--split {text!r}: person splits are numbered 0..{NUM_PERSON_SPLITS - 1}")
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
    """(mean, std) per protocol and metric over the splits; std with ddof 1 (0 for a single split). A split whose
    protocol had nothing to score (null in its metrics.json) is left out of that mean; none scored: null."""
    mean, std = {}, {}
    for protocol in protocols:
        values = {m: [v for s in sorted(per_split) if (v := per_split[s][protocol][m]) is not None] for m in METRICS}
        mean[protocol] = {m: float(np.mean(v)) if v else None for m, v in values.items()}
        std[protocol] = {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 if v else None for m, v in values.items()}
    return mean, std


def format_summary(dataset: str, splits: list[int], mode: str, mean: dict, std: dict) -> str:
    lines = [f"{name_of(dataset)}: mean ± std over {len(splits)} person splits ({', '.join(map(str, splits))}), "
             f"{mode} mode, in %"]
    lines.append(f"{'protocol':<14}" + "".join(f"{f'rank-{k}':>12}     " for k in RANKS) + f"{'mAP':>12}")
    for protocol in mean:
        cells = "".join(f"{'n/a':>9}   {'':<5}" if mean[protocol][m] is None else
                        f"{100 * mean[protocol][m]:>9.2f} ± {100 * std[protocol][m]:<5.2f}" for m in METRICS)
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


def run_splits(base: TrainConfig, which: str) -> int:
    """Train and evaluate the person splits `which` ('all', '0-4', '0,3,5') of `base` (its `out` holds them all);
    train.py's exit code."""
    from stenvan.distributed import describe
    from stenvan.evaluation.run import evaluate_checkpoint
    from stenvan.outputs import SPLIT_RUNS
    from stenvan.training.run import USER_ERRORS, check_run_folder, error, train_run

    out, mode = Path(base.out), base.eval_mode
    try:
        manifest = load_manifest(base.data)
        if manifest["dataset"] not in PERSON_SPLIT_DATASETS:
            raise ValueError(f"{base.data}: {name_of(manifest['dataset'])} has no person splits; --split all is for "
                             "iLIDS-VID and PRID-2011 (train other datasets without --split)")
        splits = parse_splits(which)
        world = describe(base.device)
        check_run_folder(base.out, base.data, SPLIT_RUNS)  # each split-N is checked as a run folder in its turn
    except USER_ERRORS as e:
        return error(e)
    for split in splits:
        if finished_split(out, split, mode) is not None:
            if world.is_main:
                print(f"splits: split {split} is done ({split_metrics(out, split, mode)}); skipped", flush=True)
            continue
        cfg = dataclasses.replace(base, split=split, out=str(out / f"split-{split}")).validate()
        if world.is_main:
            print(f"splits: split {split}: training in {cfg.out}", flush=True)
        code, progress = train_run(cfg, resume="auto")  # its newest checkpoint, if an earlier run was stopped
        if code:
            return code
        if progress.epoch < cfg.epochs and not (cfg.max_steps and progress.global_step >= cfg.max_steps):
            if world.is_main:
                print(f"splits: stopped during split {split}; rerun the same command to continue there", flush=True)
            return 0
        if world.is_main:  # the other ranks go on to the next split and wait for rank 0 there
            try:
                evaluate_checkpoint(str(out / f"split-{split}" / "last.pt"), base.data,
                                    split_metrics(out, split, mode).parent, split=split, mode=mode,
                                    device=cfg.device, precision=cfg.precision, loader=cfg.loader,
                                    workers=cfg.workers, force=True)  # split N's folder is this runner's
            except (*USER_ERRORS, OSError) as e:
                return error(error_line(e, "rerun the same command"))
    if not world.is_main:
        return 0
    per_split = {s: finished_split(out, s, mode) for s in splits}
    try:
        print(write_summary(out, manifest, base.data, mode, per_split))
    except OSError as e:
        return error(error_line(e, "rerun the same command"))
    print(f"splits: every split's outputs in {out}/split-N/, the summary in {out / SUMMARY}")
    return 0

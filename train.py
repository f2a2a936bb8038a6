"""Train a video re-id model (STE-NVAN, NVAN, ResNet-50 baseline) on prepared shards.

    python train.py --config configs/ste_nvan_mars.yaml --data shards/mars --out runs/ste_mars      # 1 process
    torchrun --nproc_per_node=8 train.py --config configs/ste_nvan_mars.yaml --data shards/mars --out runs/x
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --max-restarts=3 \\
        train.py --config configs/nvan_mars.yaml --data shards/mars --out runs/y --resume auto   # on every node
    python train.py ... --resume auto        # continue from the newest valid checkpoint in --out
    python train.py ... --max-steps 100 --lr 3e-4 --precision fp32   # any config key: --key value
    # iLIDS-VID, PRID-2011: one person split, or every split trained and evaluated in turn, then mean ± std
    python train.py --config configs/ste_nvan_ilidsvid.yaml --data shards/ilidsvid --out runs/ilids3 --split 3
    python train.py --config configs/ste_nvan_ilidsvid.yaml --data shards/ilidsvid --out runs/ilids --split all

Exit codes: 0 finished or stopped cleanly by SIGTERM/SIGINT (to this process or to torchrun: every rank saves the
same step; resume with --resume auto; `--split all` continues where it stopped when rerun), 2 an error (bad config,
data, checkpoint or run folder, another run holding --out, a shard changed under the run, a failed loader, a full
disk, a launch that cannot restart; one line on stderr says which), 3 stopped by non-finite losses or gradients.
"""

import argparse
import re
import sys

from stenvan.config import load_config
from stenvan.errors import RESUME_RETRY, describe_os_error
from stenvan.training.run import USER_ERRORS, error, train_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other --key value pairs override "
                                     "config fields (see stenvan/config.py).")
    parser.add_argument("--config", help="YAML preset, e.g. configs/ste_nvan_mars.yaml")
    parser.add_argument("--data", help="prepared shard folder")
    parser.add_argument("--out", help="run folder")
    parser.add_argument("--resume", help="'auto' (newest valid checkpoint in --out) or a checkpoint path")
    parser.add_argument("--split", help="iLIDS-VID, PRID-2011: the person split N (0..9) to train on; 'all' or a "
                        "list (0-4, 0,3,5): train and evaluate each split in --out/split-N, then their mean ± std "
                        "(--out/splits.json)")
    args, overrides = parser.parse_known_args(argv)
    # 'all', '0-4', '0,3,5': the person-split runner; one number (or anything else) is the config field `split`
    several = args.split is not None and re.fullmatch(r"all|[\d,\- ]+", args.split.strip()) is not None \
        and not args.split.strip().isdigit()
    if args.split is not None and not several:
        overrides += ["--split", args.split]
    try:
        cfg = load_config(args.config, overrides, data=args.data, out=args.out)
    except USER_ERRORS as e:  # a bad preset, override or value
        return error(e)
    except OSError as e:  # an unreadable preset: one line naming the path, no traceback
        return error(describe_os_error(e, RESUME_RETRY))
    if several:
        from stenvan.training.splits import run_splits

        return run_splits(cfg, args.split)
    return train_run(cfg, args.resume)[0]


if __name__ == "__main__":
    sys.exit(main())

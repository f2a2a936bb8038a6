"""Train a video re-id model (STE-NVAN, NVAN, ResNet-50 baseline) on prepared shards.

    python train.py --config configs/ste_nvan_mars.yaml --data shards/mars --out runs/ste_mars      # 1 process
    torchrun --nproc_per_node=8 train.py --config configs/ste_nvan_mars.yaml --data shards/mars --out runs/x
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --max-restarts=3 \
        train.py --config configs/nvan_mars.yaml --data shards/mars --out runs/y --resume auto
    python train.py ... --resume auto        # continue from the newest valid checkpoint in --out
    python train.py ... --max-steps 100 --lr 3e-4 --precision fp32   # any config key: --key value

Exit codes: 0 finished or stopped cleanly by a signal (resume with --resume auto), 2 bad config/checkpoint,
3 stopped by non-finite losses.
"""

import argparse
import sys

from stenvan.checkpoint import CheckpointError
from stenvan.config import ConfigError, load_config
from stenvan.distributed import DeviceError
from stenvan.shards import ShardFormatError

# RuntimeError: torchvision could not download the ImageNet weights (its message says how to get the file);
# FileNotFoundError: a --pretrained path that does not exist; ImportError: --loader dali without DALI.
USER_ERRORS = (ConfigError, CheckpointError, ShardFormatError, DeviceError, ValueError, FileNotFoundError,
               RuntimeError, ImportError)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other --key value pairs override "
                                     "config fields (see stenvan/config.py).")
    parser.add_argument("--config", help="YAML preset, e.g. configs/ste_nvan_mars.yaml")
    parser.add_argument("--data", help="prepared shard folder")
    parser.add_argument("--out", help="run folder")
    parser.add_argument("--resume", help="'auto' (newest valid checkpoint in --out) or a checkpoint path")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides, data=args.data, out=args.out)
        from stenvan.trainer import Trainer, TrainingStopped

        trainer = Trainer(cfg, resume=args.resume)
    except USER_ERRORS as e:  # bad config, data, checkpoint, weights file or device: one line, no traceback
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.fit()
    except TrainingStopped as e:
        print(f"train: stopped: {e}", file=sys.stderr)
        return 3
    except (ShardFormatError, CheckpointError) as e:  # a shard replaced under a running job; a failed checkpoint write
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

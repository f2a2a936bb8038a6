"""Train a video re-id model (STE-NVAN, NVAN, ResNet-50 baseline) on prepared shards.

    python train.py --config configs/ste_nvan_mars.yaml --data shards/mars --out runs/ste_mars      # 1 process
    torchrun --nproc_per_node=8 train.py --config configs/ste_nvan_mars.yaml --data shards/mars --out runs/x
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --max-restarts=3 \\
        train.py --config configs/nvan_mars.yaml --data shards/mars --out runs/y --resume auto   # on every node
    python train.py ... --resume auto        # continue from the newest valid checkpoint in --out
    python train.py ... --max-steps 100 --lr 3e-4 --precision fp32   # any config key: --key value

Exit codes: 0 finished or stopped cleanly by SIGTERM/SIGINT (to this process or to torchrun: every rank saves the
same step; resume with --resume auto), 2 an error (bad config, data, checkpoint or run folder, another run holding
--out, a shard changed under the run, a failed loader, a full disk, a launch that cannot restart; one line on
stderr says which), 3 stopped by non-finite losses or gradients.
"""

import argparse
import sys

from stenvan.checkpoint import CheckpointError
from stenvan.config import ConfigError, load_config
from stenvan.distributed import DeviceError, LaunchError
from stenvan.errors import RESUME_RETRY, describe_os_error, error_line
from stenvan.lock import LockError
from stenvan.resume import RankZeroError
from stenvan.run_folder import RunFolderError
from stenvan.shards import ShardFormatError

# RuntimeError: torchvision could not download the ImageNet weights (its message says how to get the file);
# FileNotFoundError: a --pretrained path that does not exist; ImportError: --loader dali without DALI.
USER_ERRORS = (ConfigError, CheckpointError, ShardFormatError, DeviceError, LaunchError, LockError, RunFolderError,
               RankZeroError, ValueError, FileNotFoundError, RuntimeError, ImportError)


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
        from stenvan.failures import LoaderFailed, RankFailed
        from stenvan.trainer import Trainer, TrainingStopped

        trainer = Trainer(cfg, resume=args.resume)
    except USER_ERRORS as e:  # bad config, data, checkpoint, run folder, weights or device
        return error(e)
    except OSError as e:  # --out not writable, a full disk: one line naming the path, no traceback
        return error(describe_os_error(e, RESUME_RETRY))
    code = 0
    try:
        trainer.fit()
    except TrainingStopped as e:
        print(f"train: stopped: {e}", file=sys.stderr)
        code = 3
    except (ShardFormatError, LoaderFailed, CheckpointError, RankFailed) as e:  # a shard changed under the run;
        code = error(e)  # a loader that failed; a checkpoint write that failed; one of these on another rank
    except OSError as e:
        code = error(describe_os_error(e, RESUME_RETRY))
    finally:
        try:
            trainer.close()  # waits for the checkpoint in flight, which may fail too
        except (CheckpointError, OSError) as e:
            code = code or error(error_line(e, RESUME_RETRY))
    return code


def error(e) -> int:
    print(f"train: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""One training run from its config, start to end, as train.py runs it (and the person-split runner, for each
split): every failure a user can cause ends in one line on stderr and an exit code, never a traceback.

Exit codes: 0 finished or stopped cleanly by SIGTERM/SIGINT (to this process or to torchrun: every rank saves the
same step; continue with --resume auto), 2 an error (bad config, data, checkpoint or run folder, another run holding
--out, a shard changed under the run, a failed loader, a full disk, a launch that cannot restart), 3 stopped by
non-finite losses or gradients.
"""

from __future__ import annotations


from stenvan.checkpoint import CheckpointError
from stenvan.config import ConfigError, TrainConfig
from stenvan.distributed import DeviceError, LaunchError
from stenvan.distributed import describe as describe_world
from stenvan.errors import RESUME_RETRY, describe_os_error, error_line, print_line
from stenvan.lock import LockError
from stenvan.outputs import RUN_FOLDER, check_output
from stenvan.shards import ShardFormatError
from stenvan.training.resume import RankZeroError
from stenvan.training.run_folder import RunFolderError

# RuntimeError: torchvision could not download the ImageNet weights (its message says how to get the file);
# FileNotFoundError: a --pretrained path that does not exist; ImportError: --loader dali without DALI.
USER_ERRORS = (ConfigError, CheckpointError, ShardFormatError, DeviceError, LaunchError, LockError, RunFolderError,
               RankZeroError, ValueError, FileNotFoundError, RuntimeError, ImportError)


def error(line) -> int:
    """Print train.py's one error line (a message, or an error whose message is one); exit code 2."""
    print_line(f"train: error: {line}")
    return 2


def check_run_folder(out: str, data: str, kind=RUN_FOLDER) -> None:
    """Before any work: the run folder is new, empty or one of `kind`, never the dataset or inside it (OutputError).
    Rank 0 alone looks: the others would race with the files it creates there; a refusal on rank 0 ends every
    rank (torchrun stops the group)."""
    if describe_world().is_main:
        check_output(out, kind, {"--data": data}, command="train.py")


def train_run(cfg: TrainConfig, resume: str | None = None):
    """Build the trainer and fit: (exit code, the run's Progress, or None if it never started)."""
    from stenvan.training.failures import LoaderFailed, RankFailed
    from stenvan.training.trainer import Trainer, TrainingStopped

    try:
        check_run_folder(cfg.out, cfg.data, RUN_FOLDER)
        trainer = Trainer(cfg, resume=resume)
    except USER_ERRORS as e:  # bad config, data, checkpoint, run folder, weights or device
        return error(e), None
    except OSError as e:  # --out not writable, a full disk: one line naming the path, no traceback
        return error(describe_os_error(e, RESUME_RETRY)), None
    code, progress = 0, None
    try:
        progress = trainer.fit()
    except TrainingStopped as e:
        print_line(f"train: stopped: {e}")
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
    return code, progress

"""The training configuration: one typed, frozen dataclass, YAML presets in `configs/`, `--key value` overrides.

The resolved config is printed at start, saved as `config.yaml` in the run folder and stored in every
checkpoint. Library functions take plain arguments; only the trainer (`stenvan.training.trainer`), the model
builder (`stenvan.models.from_config`) and the model loader of `stenvan.evaluation.evaluate` read this object.
"""

from __future__ import annotations

import dataclasses
import math
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    """An unknown key, an ill-typed value or a broken invariant; the message says which and what is valid."""


@dataclass(frozen=True)
class TrainConfig:
    # --- run ---
    data: str = ""  # prepared shard folder (python -m prepare ...)
    split: int = -1  # iLIDS-VID, PRID-2011: the person split 0..9 to train on (its train persons); -1: none
    out: str = "runs/default"  # run folder: config.yaml, checkpoints, metrics.jsonl, TensorBoard events
    seed: int = 0  # drives sampling, augmentation and initialisation
    device: str = "auto"  # auto | cpu | cuda (torchrun gives each process its LOCAL_RANK GPU)
    # --- model (design §3) ---
    arch: Literal["baseline", "nvan", "ste_nvan"] = "ste_nvan"
    pretrained: str = "imagenet"  # imagenet | none | /path/to/resnet50.pth
    stem_relu: bool = False  # the original has no ReLU after the stem BN; True restores it
    attention: Literal["fused", "reference"] = "fused"  # SDPA kernels, or explicit matmul-softmax-matmul
    stripes: int = 16  # STE-NVAN spatial reduction: horizontal stripes per frame
    temporal_attention: Literal["pair", "clip"] = "pair"  # STE-NVAN: attend within frame pairs (released) or clip
    # --- data (design §4) ---
    loader: Literal["dali", "torch"] = "dali"
    clip_len: int = 8  # frames per clip, T
    height: int = 256
    width: int = 128
    ids_per_batch: int = 8  # P identities per (global) batch
    tracklets_per_id: int = 4  # K tracklets per identity, drawn with replacement
    batches_per_epoch: int = 0  # 0: floor(#train ids / P), the paper's epoch (78 on MARS)
    workers: int = 4  # loader worker processes per rank
    flip_p: float = 0.5  # clip-level horizontal flip probability
    pad: int = 0  # pad-and-crop augmentation, pixels (0 = off, the paper)
    erase_p: float = 0.0  # random erasing probability (0 = off, the paper)
    # --- optimisation ---
    epochs: int = 200
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # sgd: momentum 0.9
    lr: float = 1e-4
    weight_decay: float = 5e-5
    lr_schedule: Literal["step", "multistep", "cosine"] = "step"
    lr_step_epochs: int = 50  # step schedule: multiply by lr_gamma every this many epochs
    lr_milestones: tuple[int, ...] = ()  # multistep schedule: epochs at which to multiply by lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: int = 0  # linear warm-up from lr/100
    triplet: Literal["soft", "margin"] = "soft"  # batch-hard soft-margin (the paper) or hinge with a margin
    triplet_margin: float = 0.3  # only for triplet=margin
    triplet_weight: float = 1.0
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    # --- speed ---
    # auto: bf16 on a GPU (fp16 + GradScaler on GPUs without bf16, e.g. V100), fp32 on the CPU
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    # BatchNorm statistics of the global batch, as one process computes them (auto: on with > 1 GPU; true: also gloo)
    sync_bn: Literal["auto", "true", "false"] = "auto"
    freeze_bn: bool = False  # BatchNorm uses its running statistics while training (no batch statistics)
    # --- bookkeeping ---
    max_steps: int = 0  # stop after this many optimizer steps in total (0: run all epochs)
    ckpt_minutes: float = 10.0  # checkpoint every this many minutes (written in the background); 0: off
    ckpt_every: int = 0  # also checkpoint every N steps (0: off); the run's end and a signal always checkpoint
    keep_ckpts: int = 3  # step checkpoints kept on disk (last.pt always points to the newest)
    log_every: int = 20  # steps between log lines (losses reach the host only then)
    eval_every: int = 0  # evaluate every N epochs (0: never during training)
    eval_mode: Literal["paper", "dense"] = "paper"
    select_on_test: bool = False  # keep best.pt by test mAP: selects on the test set, so off unless asked
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row

    def validate(self) -> "TrainConfig":
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.data), "data: set the prepared shard folder (--data shards/mars)")
        need(-1 <= self.split < 10, f"split={self.split}: person splits are numbered 0..9 (-1: the dataset has none)")
        need(self.clip_len >= 1, "clip_len must be at least 1")
        need(self.arch != "ste_nvan" or self.clip_len % 4 == 0,
             f"clip_len={self.clip_len}: STE-NVAN halves the frames twice, so clip_len must be a multiple of 4")
        need(self.height >= 16 and self.width >= 16 and self.height % 16 == 0 and self.width % 16 == 0,
             f"height={self.height}, width={self.width}: both must be positive multiples of 16 (ResNet strides)")
        need(self.stripes >= 1, f"stripes={self.stripes} must be at least 1")
        need(self.arch != "ste_nvan" or (self.height // 16) % self.stripes == 0,
             f"stripes={self.stripes} must divide the layer-3 feature height height/16 = {self.height // 16}")
        need(self.ids_per_batch >= 2 and self.tracklets_per_id >= 2,
             "ids_per_batch and tracklets_per_id must be at least 2 (the triplet loss needs positives and negatives)")
        need(self.epochs >= 1, f"epochs={self.epochs} must be at least 1")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr} must be a positive finite number")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be >= 0")
        need(math.isfinite(self.lr_gamma) and self.lr_gamma > 0, f"lr_gamma={self.lr_gamma} must be > 0")
        need(self.lr_step_epochs >= 1, f"lr_step_epochs={self.lr_step_epochs} must be at least 1")
        need(0 <= self.warmup_epochs <= self.epochs, f"warmup_epochs={self.warmup_epochs} must be in 0..epochs")
        need(self.workers >= 0 and self.batches_per_epoch >= 0, "workers and batches_per_epoch must be >= 0")
        need(0 <= self.flip_p <= 1 and 0 <= self.erase_p <= 1 and self.pad >= 0, "flip_p, erase_p in [0, 1], pad >= 0")
        need(self.lr_schedule != "multistep" or len(self.lr_milestones) > 0,
             "lr_schedule=multistep needs lr_milestones (e.g. --lr_milestones 40,70)")
        need(list(self.lr_milestones) == sorted(self.lr_milestones), "lr_milestones must be increasing")
        need(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        need(self.device in ("auto", "cpu", "cuda"), f"device={self.device!r}: valid values are auto, cpu, cuda")
        need(self.log_every >= 1 and self.keep_ckpts >= 1 and self.max_nonfinite >= 1,
             "log_every, keep_ckpts and max_nonfinite must be at least 1")
        need(self.max_steps >= 0 and self.ckpt_every >= 0 and self.eval_every >= 0,
             "max_steps, ckpt_every, eval_every must be >= 0")
        need(math.isfinite(self.ckpt_minutes) and self.ckpt_minutes >= 0, "ckpt_minutes must be >= 0")
        return self

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=3)
    return ConfigError(f"{source}: unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                  else "; see stenvan/config.py for the keys"))


def coerce(key: str, value, source: str):
    """Check (and for command-line strings, convert) a value against the field's type."""
    if key not in FIELDS:
        raise _unknown(key, source)
    hint = HINTS[key]
    from_text = isinstance(value, str)
    bad = lambda what: ConfigError(f"{source}: {key}={value!r} is not {what}")  # noqa: E731
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if "true" in choices and (isinstance(value, bool) or (from_text and value.lower() in ("true", "false"))):
            value = str(value).lower()  # YAML's `sync_bn: true` is a bool; keep "true"/"false" as the names
        if value not in choices:
            raise ConfigError(f"{source}: {key}={value!r}; valid values are {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad("a boolean (true/false)")  # never bool("false") == True
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and value.strip().lstrip("-").isdigit():
            return int(value)
        raise bad("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(value)  # YAML reads 1e-4 as a string; accept it
            except ValueError:
                pass
        raise bad("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if typing.get_origin(hint) is tuple:
        items = [v for v in value.split(",") if v.strip()] if from_text else value
        if not isinstance(items, (list, tuple)):
            raise bad("a list of integers")
        return tuple(coerce_int_item(key, v, source) for v in items)
    raise ConfigError(f"{source}: {key} has an unsupported type {hint}")  # pragma: no cover - a coding error


def coerce_int_item(key: str, v, source: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    raise ConfigError(f"{source}: {key} items must be integers, got {v!r}")


def load_config(path: str | None = None, overrides: list[str] | None = None, **fixed) -> TrainConfig:
    """Preset YAML (optional) → `--key value` overrides → validated TrainConfig."""
    values: dict = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found (presets are in configs/)") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder; --config takes a YAML file (presets are in configs/)") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror}); --config takes a YAML file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file; --config takes a YAML file (presets are in configs/)") \
                from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"{path}: not valid YAML{where} ({problem}); fix the file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        for key in loaded:
            if not isinstance(key, str):  # YAML reads `1: 2` as an int key, `~: 2` as None
                raise ConfigError(f"{path}: the key {key!r} is not a config key name; keys are names like arch or "
                                  "lr (see stenvan/config.py)")
        values.update({k: coerce(k, v, path) for k, v in loaded.items()})
    values.update(parse_overrides(overrides or []))
    values.update({k: coerce(k, v, "arguments") for k, v in fixed.items() if v is not None})
    return TrainConfig(**values).validate()


def parse_overrides(args: list[str]) -> dict:
    """['--lr', '3e-4', '--arch=nvan'] → {'lr': 3e-4, 'arch': 'nvan'} (dashes in keys become underscores)."""
    out, i = {}, 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {token!r}")
        key, _, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not _:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: --{key} needs a value")
            value = args[i + 1]
            i += 1
        out[key] = coerce(key, value, "command line")
        i += 1
    return out


def config_from_dict(d: dict, source: str = "checkpoint") -> TrainConfig:
    return TrainConfig(**{k: coerce(k, v, source) for k, v in d.items()})

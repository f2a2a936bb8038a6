"""Whether this run may continue a checkpoint: what a resumed run must keep, and what it may change.

A resume continues one run. A run that trains another model function, on other data, with other batches or
another optimizer is a different run: its checkpoint state would not fit (resuming Adam's state with SGD crashed
at the first step) or would silently mean something else (the sampler's position and the schedule count steps of
the saved batch; weights trained without the stem ReLU do not become weights trained with it). Those changes are
refused with one line, without a flag to force them: such a run belongs in another --out, where its step
numbers, schedule and log do not mix with the first run's. Every other change is allowed and printed: the lr
and weight decay take effect (the optimizer's saved hyperparameters would otherwise silently override them),
the schedule, losses, augmentation, BatchNorm mode, loader, seed (the batches from here on) and bookkeeping
follow the new config, a change of precision into or out of fp16 starts a fresh GradScaler, and with another
`channels_last` the optimizer state takes the parameters' new memory layout. The number of ranks and of GPUs may
change too (the global batch stays P·K).
"""

from __future__ import annotations

from pathlib import Path

from stenvan.amp import load_scaler_state
from stenvan.checkpoint import CheckpointError
from stenvan.config import TrainConfig, config_from_dict
from stenvan.training.optim import match_parameter_layouts

# Config fields a resumed run must keep, and what each decides.
MUST_KEEP = {
    "split": "the person split: its train persons are the model's classes",
    "arch": "the model",
    "stem_relu": "the model's function (the weights were trained for it)",
    "stripes": "the model's function (the weights were trained for it)",
    "temporal_attention": "the model's function (the weights were trained for it)",
    "clip_len": "the clips the model was trained on",
    "height": "the clips the model was trained on",
    "width": "the clips the model was trained on",
    "ids_per_batch": "the batch, the sampler's position and the steps of an epoch",
    "tracklets_per_id": "the batch and the sampler's position",
    "batches_per_epoch": "the steps of an epoch: the sampler's position and the schedule",
    "optimizer": "the optimizer state in the checkpoint",
}
# Allowed changes that need more than a new config to take effect (see `stenvan.training.trainer.Trainer._restore`).
APPLIED = ("lr", "weight_decay")


def check_resumable(path: Path, state: dict, cfg: TrainConfig, num_classes: int, steps_per_epoch: int,
                    dataset: str) -> dict:
    """Raise CheckpointError (one line) if this run may not continue `state`; else {field: (saved, now)} of the
    allowed config changes. `dataset` is this run's `stenvan.shards.dataset_fingerprint`."""
    saved = config_from_dict(state["config"]).to_dict()  # fields newer than the checkpoint: their defaults
    now = cfg.to_dict()
    refused = [f"{key} {saved[key]} → {now[key]} ({why})" for key, why in MUST_KEEP.items() if saved[key] != now[key]]
    if state["num_classes"] != num_classes:
        refused.append(f"{state['num_classes']} → {num_classes} training identities (the classifier)")
    saved_dataset = state.get("dataset")
    if saved_dataset is not None and saved_dataset != dataset:
        refused.append(f"dataset {saved_dataset[:12]}… → {dataset[:12]}… (the prepared dataset's fingerprint: "
                       f"{cfg.data} holds other data than the run was trained on)")
    if refused:
        raise CheckpointError(f"{path}: a resumed run must keep what its checkpoint was trained with, but this run "
                              f"changes {'; '.join(refused)}. Resume with the run's own settings and data, or "
                              "start a new run in another --out")
    if state["progress"]["step_in_epoch"] >= steps_per_epoch:  # only an old checkpoint without its dataset
        raise CheckpointError(f"{path}: saved at step {state['progress']['step_in_epoch']} of an epoch, but this "
                              f"run has {steps_per_epoch} steps per epoch; resume with the run's data and batches")
    return {k: (saved[k], v) for k, v in now.items() if saved[k] != v}


def restore_training_state(state: dict, changes: dict, optimizer, scheduler, scaler, cfg: TrainConfig,
                           precision: str) -> list[str]:
    """Load the optimizer, scheduler and GradScaler states of `state`, with the allowed `changes` (from
    `check_resumable`) in effect; returns one note per change, for the resume line."""
    optimizer.load_state_dict(state["optimizer"])
    match_parameter_layouts(optimizer)  # a run resumed with another channels_last setting
    scheduler.load_state_dict(state["scheduler"])
    # The saved param groups and base lrs carry the old run's lr and weight decay: this run's take over.
    if any(k in changes for k in APPLIED):
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, lr=cfg.lr * factor(scheduler.last_epoch))
    # Only fp16 has a GradScaler state; into or out of fp16, the scaler starts afresh (its scale re-adapts).
    saved_precision = state.get("precision") or ("fp16" if state["scaler"] else None)  # older: from the scaler
    if (saved_precision == "fp16") == scaler.is_enabled():
        load_scaler_state(scaler, state["scaler"])
    notes = [f"{k} {old} → {new}" + (" (applied)" if k in APPLIED else "") for k, (old, new) in changes.items()]
    if saved_precision not in (None, precision):
        notes.append(f"training precision {saved_precision} → {precision}"
                     + (" (a fresh GradScaler)" if "fp16" in (saved_precision, precision) else ""))
    if "dataset" not in state:
        notes.append("the checkpoint does not record its dataset (written by an older stenvan): not checked")
    return notes

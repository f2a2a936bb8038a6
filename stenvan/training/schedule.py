"""Learning-rate schedules as a pure function of the optimizer step (so resuming needs only the step)."""

from __future__ import annotations

import math


def lr_factor(step: int, steps_per_epoch: int, *, schedule: str, epochs: int, step_epochs: int = 50,
              milestones: tuple[int, ...] = (), gamma: float = 0.1, warmup_epochs: int = 0) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based).

    step: ×gamma every `step_epochs` epochs (the paper: ×0.1 every 50); multistep: ×gamma at each milestone
    epoch; cosine: half-cosine from 1 to 0 over all epochs. Warm-up: linear from 1/100 over `warmup_epochs`.
    The schedule changes at epoch boundaries, as the original's per-epoch scheduler did (cosine: per step).
    """
    epoch = step // steps_per_epoch
    if schedule == "step":
        factor = gamma ** (epoch // step_epochs)
    elif schedule == "multistep":
        factor = gamma ** sum(epoch >= m for m in milestones)
    elif schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(step / (epochs * steps_per_epoch), 1.0)))
    else:
        raise ValueError(f"lr_schedule={schedule!r}; valid values are step, multistep, cosine")
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        factor *= 0.01 + 0.99 * step / warmup_steps
    return factor

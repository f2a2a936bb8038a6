"""Training numbers kept on the device between sync points: a step never waits for the GPU to report them.

One float tensor, updated with tensor ops each step and read (one all-reduce, one copy to the host) every
`log_every` steps, where the ranks also agree on the non-finite stop (stop signals are agreed at every step on
the host: stenvan.training.failures).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Slots: sums over the window's good steps of the loss and its parts, good and skipped steps in the window,
# the current run of non-finite steps, and the longest run seen in the window.
LOSS, TRIPLET, CE, GOOD, SKIPPED, RUN, LONGEST = range(7)


class StepMeter:
    def __init__(self, device: torch.device):
        self.values = torch.zeros(7, device=device)

    def update(self, losses: dict[str, torch.Tensor], bad: torch.Tensor) -> None:
        """Add one step: `bad` (0-d, 1.0 = a non-finite loss or gradient on some rank, the step was skipped)."""
        v, bad = self.values, bad.reshape(1)
        parts = torch.stack([losses["loss"].detach().float(), losses["triplet"], losses["ce"]])  # (3,)
        v[:SKIPPED + 1] += torch.cat([parts.masked_fill(bad.bool(), 0.0), 1 - bad, bad])  # no NaN in the sums
        v[RUN:RUN + 1] = (v[RUN:RUN + 1] + 1) * bad
        v[LONGEST:LONGEST + 1] = torch.maximum(v[LONGEST:LONGEST + 1], v[RUN:RUN + 1])

    def read(self, world_size: int) -> dict:
        """The window's numbers averaged over the ranks.

        This is the one host-device sync of a window. Losses are means over ranks and good steps; the step
        counts are the same on every rank (each step's `bad` flag was agreed), so their mean is their value.
        """
        packed = self.values.clone()
        if world_size > 1:
            dist.all_reduce(packed)
        values = packed.tolist()  # the sync point
        n = float(world_size)
        good = round(values[GOOD] / n)
        out = {"good": good, "skipped": round(values[SKIPPED] / n), "run": round(values[RUN] / n),
               "longest": round(values[LONGEST] / n)}
        if good:
            out.update(loss=values[LOSS] / n / good, triplet=values[TRIPLET] / n / good, ce=values[CE] / n / good)
        return out

    def next_window(self) -> None:
        """Start a new window; the current run of non-finite steps carries over."""
        self.values[:SKIPPED + 1] = 0.0
        self.values[LONGEST:LONGEST + 1] = self.values[RUN:RUN + 1]

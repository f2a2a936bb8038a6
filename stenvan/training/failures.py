"""Failures and stops that every rank acts on together: a rank that stopped alone would leave the others waiting in
the next collective until its 30-minute timeout (and, with NCCL, with no checkpoint).

A rank's error (its loader failed: a shard changed under the job, a worker died; rank 0 could not write a
checkpoint or a log line; an evaluation on rank 0 failed) is kept until the next point every rank reaches together
(a step boundary, before the step's collectives; a checkpoint wait), where `agree` tells every rank whether any
rank failed, which one, its line, and whether any rank got a stop signal (SIGTERM, SIGINT): so a stop is agreed at
the first step boundary after the signal, on every rank at the same step. Two integers all-reduced on the CPU per
agreement (stenvan.distributed.agree_on_host): the GPU never waits for it. In a world of one, `agree` just returns
this process's error and signal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from stenvan import distributed
from stenvan.checkpoint import CheckpointError
from stenvan.errors import RESUME_RETRY, error_line
from stenvan.shards import ShardFormatError

KEPT = (CheckpointError, ShardFormatError, OSError)  # what `keep` holds back until the next agreement


class RankFailed(Exception):
    """Another rank failed (a shard changed under it, a checkpoint it could not write): this rank stopped with it,
    at the same step; the message is that rank's line."""


class LoaderFailed(Exception):
    """This rank's loader failed for another reason than the data (e.g. a worker process was killed)."""

    @classmethod
    def of(cls, error: BaseException) -> "LoaderFailed":
        """One line for a loader's error: DALI hands a worker's failure over as text with its traceback in it, whose
        last line is the worker's error itself ("ValueError: ..."), else the error's type and message."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        last = lines[-1] if lines else "no message"
        named = re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b:", last)
        failed = cls(f"the loader failed: {last if named else f'{type(error).__name__}: {last}'}")
        failed.__cause__ = error
        return failed


@dataclass
class Agreement:
    error: BaseException | None  # what this rank raises: its own error, or RankFailed with the failing rank's line
    loader: bool  # the failure came from a loader (or data): the step boundary is sound, its checkpoint worth keeping
    data: bool  # it was the data (a shard changed under the job)
    stop: int  # the highest stop signal any rank got, 0 if none


class Failures:
    def __init__(self, world: distributed.World, store, group):
        self.world, self.store, self.group = world, store, group
        self.kept: BaseException | None = None

    def keep(self, action: Callable, *args) -> None:
        """Run `action`; an error of it (one of KEPT) waits for the next `agree` instead of stopping this rank
        alone."""
        try:
            action(*args)
        except KEPT as e:
            self.kept = self.kept or e

    def agree(self, error: BaseException | None = None, *, loader: bool = False, stop_signal: int = 0) -> Agreement:
        """At a point every rank reaches together: whether any rank failed (`error` here, from its loader if
        `loader`, or one kept since), and the stop signal any rank got."""
        loader = loader and error is not None  # the error passed in is the loader's, not one kept since
        error, self.kept = error or self.kept, None
        data = isinstance(error, ShardFormatError)
        loader = loader or data
        line = None if error is None else json.dumps({"line": error_line(error, RESUME_RETRY), "loader": loader,
                                                      "data": data})
        if self.world.size == 1:
            return Agreement(error, loader, data, stop_signal)
        found, stop = distributed.agree_on_host(line, stop_signal, self.world.rank, self.world.size, self.store,
                                                self.group)
        if found is None:
            return Agreement(None, False, False, stop)
        rank, line = found
        failure = json.loads(line)
        if error is None or rank != self.world.rank:
            error = RankFailed(f"rank {rank}: {failure['line']}")
        return Agreement(error, failure["loader"], failure["data"], stop)

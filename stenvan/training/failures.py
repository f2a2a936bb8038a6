"""Failures that stop every rank together: a rank that stopped alone would leave the others waiting in the next
collective until its 30-minute timeout (and, with NCCL, with no checkpoint).

A rank's error (its loader found a shard changed under the job; rank 0 could not write a checkpoint or a log line;
an evaluation on rank 0 failed) is kept until the next point every rank reaches together (a step boundary, before
the step's collectives; a checkpoint wait), where `agree` tells every rank whether any rank failed, which one,
and its line. One integer all-reduced on the CPU per agreement (stenvan.distributed.first_failure): the GPU never
waits for it. In a world of one, `agree` just returns this process's error.
"""

from __future__ import annotations

import json
from typing import Callable

from stenvan import distributed
from stenvan.checkpoint import CheckpointError
from stenvan.errors import RESUME_RETRY, error_line
from stenvan.shards import ShardFormatError

KEPT = (CheckpointError, ShardFormatError, OSError)  # what `keep` holds back until the next agreement


class RankFailed(Exception):
    """Another rank failed (a shard changed under it, a checkpoint it could not write): this rank stopped with it,
    at the same step; the message is that rank's line."""


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

    def agree(self, error: BaseException | None = None) -> tuple[BaseException, bool] | None:
        """At a point every rank reaches together: None if no rank failed (`error` here, or one kept), else (what
        this rank raises: its own error, or RankFailed with the failing rank's line; whether it was a data error)."""
        error, self.kept = error or self.kept, None
        line = None if error is None else json.dumps({
            "line": error_line(error, RESUME_RETRY), "data": isinstance(error, ShardFormatError)})
        if self.world.size > 1:
            found = distributed.first_failure(line, self.world.rank, self.world.size, self.store, self.group)
            if found is None:
                return None
            rank, line = found
            if error is None or rank != self.world.rank:
                error = RankFailed(f"rank {rank}: {json.loads(line)['line']}")
        elif error is None:
            return None
        return error, json.loads(line)["data"]

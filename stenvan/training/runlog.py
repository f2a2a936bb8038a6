"""Two log streams of a run: one compact human line per interval and the same numbers in metrics.jsonl
(plus TensorBoard scalars). Only the main rank writes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(self.run_dir / "tb"))
                except ImportError:  # tensorboard is a declared dependency; tolerate its absence in a bare env
                    print("log: tensorboard not installed, no TensorBoard scalars", file=sys.stderr)

    def info(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def record(self, kind: str, step: int, values: dict, line: str | None = None) -> None:
        """One JSON line {kind, step, time, **values}, TensorBoard scalars `<kind>/<name>`, and a human line."""
        if not self.enabled:
            return
        try:
            self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
            self.jsonl.flush()
        except OSError as e:  # a full disk: a failed write names no file, so name ours
            e.filename = e.filename or str(self.run_dir / "metrics.jsonl")
            raise
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{kind}/{name}", value, step)
        if line:
            self.info(line)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()

"""Checkpoints off the critical path: a host copy of the state, written and verified while training goes on.

`save` runs at a step boundary on the training thread. It waits for the previous write (only that), copies
every tensor of the state into host buffers and hands the copy to a background thread, which writes it with
`save_checkpoint` / `write_checkpoint_file` (atomic, read back against its sha256, sidecar, last.pt). On a GPU
the copies are non-blocking into pinned buffers that are reused from one save to the next; the writer thread
waits on a CUDA event for them, so the training thread never waits for the GPU. The step after `save` updates
the parameters in place, but on the same CUDA stream, after the copies.

A failed write is raised (as CheckpointError) by the next `save` or `wait`: the run stops rather than
training on without checkpoints. A state whose weights or optimizer state hold a NaN or an infinity is not
written (it would become last.pt, which a resume and the non-finite stop's message trust): that is a failed write
too, whose line names the tensor and the newest checkpoint with finite weights. The check runs on the host copy,
in the background thread: the GPU never waits for it. `wait_s` counts the seconds the training thread spent in
`save` and `wait`, the time training waits for checkpoints.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from stenvan.checkpoint import CheckpointError, save_checkpoint, write_checkpoint_file
from stenvan.errors import RESUME_RETRY, error_line


class CheckpointWriter:
    def __init__(self, run_dir, keep: int, log: Callable[[str], None] = print):
        self.run_dir, self.keep, self.log = Path(run_dir), keep, log
        self.wait_s = 0.0  # seconds the training thread spent snapshotting and waiting for writes
        self.written = 0  # checkpoints written and verified
        self.last_path: Path | None = None  # the newest step checkpoint written (its weights are finite)
        self._buffers: dict[str, torch.Tensor] = {}  # host copies, reused (pinned for CUDA tensors)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, *, step: int | None = None, path=None, reason: str = "") -> None:
        """Snapshot `state` now; write it in the background as `step-<step>.pt` (+ last.pt, keeping the newest
        `keep`) when `step` is given, else as `path` (e.g. best.pt)."""
        start = time.perf_counter()
        self._join()
        snapshot, copied = self._to_host(state, "")
        ready = None
        if copied:  # CUDA tensors were copied asynchronously: the writer waits for this event
            ready = torch.cuda.Event()
            ready.record()
        self._thread = threading.Thread(target=self._write, args=(snapshot, ready, step, path, reason),
                                        name="checkpoint-writer")  # not a daemon: exiting waits for the write
        self._thread.start()
        self.wait_s += time.perf_counter() - start

    def wait(self) -> None:
        """Block until the last checkpoint is on disk (at the end of a run, before exiting on a signal)."""
        start = time.perf_counter()
        self._join()
        self.wait_s += time.perf_counter() - start

    close = wait

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint in {self.run_dir} failed: {error_line(error, RESUME_RETRY)}") \
                from error

    def _to_host(self, obj, key: str):
        """(a copy of `obj` whose tensors live in this writer's host buffers, whether any came from CUDA)."""
        if isinstance(obj, torch.Tensor):
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != obj.shape or buffer.stride() != obj.stride() \
                    or buffer.dtype != obj.dtype:
                # The same strides: a channels_last parameter's Adam moments must load back channels_last, as
                # the fused kernels walk a parameter, its gradient and its moments in memory order together.
                buffer = torch.empty_like(obj, device="cpu", pin_memory=obj.is_cuda)
                self._buffers[key] = buffer
            buffer.copy_(obj.detach(), non_blocking=obj.is_cuda)
            return buffer, obj.is_cuda
        if isinstance(obj, (dict, list, tuple)):
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            copies = {k: self._to_host(v, f"{key}/{k}") for k, v in items}
            copied = any(c for _, c in copies.values())
            if isinstance(obj, dict):
                return {k: v for k, (v, _) in copies.items()}, copied
            return type(obj)(v for v, _ in copies.values()), copied
        return copy.deepcopy(obj), False  # numbers, strings: the training thread may change the originals

    def _write(self, snapshot: dict, ready, step: int | None, path, reason: str) -> None:
        try:
            if ready is not None:
                ready.synchronize()
            bad = first_nonfinite({"model": snapshot.get("model"), "optimizer": snapshot.get("optimizer")})
            if bad is not None:
                newest = f"the newest checkpoint with finite weights is {self.last_path}" if self.last_path else \
                    "no checkpoint of this run has been written yet"
                raise CheckpointError(f"{f'step {step}' if step is not None else path} not written: {bad} holds "
                                      f"NaN or infinite values (training diverged); {newest}")
            written = (save_checkpoint(snapshot, self.run_dir, step, self.keep) if step is not None
                       else write_checkpoint_file(snapshot, path))
            self.written += 1
            if step is not None:
                self.last_path = written
            self.log(f"checkpoint: {written}" + (f" ({reason})" if reason else ""))
        except BaseException as e:  # noqa: BLE001 - raised on the training thread by the next save or wait
            self._error = e


def first_nonfinite(tree, name: str = "") -> str | None:
    """The name ("model/layer1.0.conv1.weight") of the first floating-point tensor in `tree` (nested dicts,
    lists, tuples) holding a NaN or an infinity, or None."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    if isinstance(tree, (dict, list, tuple)):
        for key, value in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
            found = first_nonfinite(value, f"{name}/{key}" if name else str(key))
            if found is not None:
                return found
    return None

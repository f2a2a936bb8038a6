"""Self-describing, atomic, verifiable checkpoints.

A checkpoint is one dict (format name and version, config, model, optimizer, scaler, scheduler, progress,
sampler position, RNG states) saved with `torch.save`, written to a temp file, read back and checked against
the sha256 of the bytes written, then renamed. The sha256 goes into a sidecar `<name>.sha256` written after
it, so a truncated or corrupted file is detected and skipped on resume (and set aside as `<name>.bad`).
`last.pt` is a hard link to the newest checkpoint. Everything loads with `weights_only=True`.
`stenvan.checkpoint_writer` writes these files in the background; `stenvan.resume` picks the one to resume from.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from stenvan.shards import atomic_write, sha256_file

FORMAT = "stenvan-checkpoint"
VERSION = 1
STEP_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class _HashingFile:
    """A write-only file that hashes what goes through it (torch.save streams into it: no second copy in memory)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_checkpoint_file(state: dict, path: str | os.PathLike) -> Path:
    """Write one tagged checkpoint atomically and verified, then its `.sha256` sidecar.

    The file is streamed to a temp file, synced, read back and compared with the sha256 of the bytes handed to
    the file system; only a file that matches is renamed into place.
    """
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            out = _HashingFile(f)
            torch.save({"format": FORMAT, "version": VERSION, **state}, out)
            f.flush()
            os.fsync(f.fileno())
        digest = out.sha256.hexdigest()
        if sha256_file(tmp) != digest:
            raise CheckpointError(f"{path}: the bytes read back differ from those written; check the disk")
        sidecar.unlink(missing_ok=True)  # a stale hash beside a rewritten file would make it look corrupt
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write(sidecar, digest + "\n")
    return path


def save_checkpoint(state: dict, run_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Write `step-<step>.pt` (+ .sha256), point last.pt at it, keep the newest `keep` step files."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = write_checkpoint_file(state, run_dir / f"step-{step:09d}.pt")
    link_tmp = run_dir / f".last.pt.{os.getpid()}.tmp"
    if link_tmp.exists():
        link_tmp.unlink()
    os.link(path, link_tmp)  # last.pt shares the bytes of the newest step file; the rename is atomic
    os.replace(link_tmp, run_dir / "last.pt")
    for old in step_checkpoints(run_dir)[:-keep]:
        old.unlink()
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def step_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Step checkpoints in `run_dir`, oldest first."""
    return sorted(Path(p) for p in glob.glob(os.path.join(run_dir, "step-*.pt")) if STEP_NAME.match(Path(p).name))


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and check one checkpoint file; raises CheckpointError naming the file and the problem."""
    return read_checkpoint_and_digest(path, map_location)[0]


def read_checkpoint_and_digest(path: str | os.PathLike, map_location="cpu") -> tuple[dict, str]:
    """`read_checkpoint`, and the sha256 of the file (how ranks check that they read the same bytes)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    digest = sha256_file(path)
    sidecar = path.with_name(path.name + ".sha256")
    if path.name == "last.pt":  # last.pt is a link to a step file: its sidecar is the step file's
        target = next((p for p in step_checkpoints(path.parent) if os.path.samefile(p, path)), None)
        sidecar = target.with_name(target.name + ".sha256") if target else sidecar
    if sidecar.is_file() and sidecar.read_text().strip() != digest:
        raise CheckpointError(f"{path}: sha256 does not match {sidecar.name}: the file is corrupt or truncated")
    try:
        # Memory-mapped: the tensors are read from the page cache, which the ranks of a node resuming from the
        # same file share, instead of every rank holding the file's bytes and a copy of them.
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e}); it is truncated, corrupt or "
                              "not a PyTorch checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a stenvan checkpoint (no format tag); an original STE-NVAN .pth is "
                              "evaluated with eval.py --original-arch ARCH")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state.get('version')}, this stenvan reads "
                              f"version {VERSION}")
    return state, digest


def newest_valid_checkpoint(run_dir: str | os.PathLike, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest step checkpoint that loads and verifies; damaged newer ones are reported and skipped."""
    found = newest_valid_checkpoint_and_digest(run_dir, map_location)
    return found and found[:2]


def newest_valid_checkpoint_and_digest(run_dir: str | os.PathLike,
                                       map_location="cpu") -> tuple[Path, dict, str] | None:
    """`newest_valid_checkpoint`, with the sha256 of the file. Only one process may call it on a run folder at a
    time (it renames damaged files): in a distributed run, rank 0 (see `stenvan.resume`)."""
    for path in reversed(step_checkpoints(run_dir)):
        try:
            return (path, *read_checkpoint_and_digest(path, map_location))
        except CheckpointError as e:
            # Set aside as <name>.bad: kept for inspection, but no longer counted among the kept checkpoints.
            os.replace(path, path.with_name(path.name + ".bad"))
            sidecar = path.with_name(path.name + ".sha256")
            if sidecar.exists():
                os.replace(sidecar, path.with_name(path.name + ".sha256.bad"))
            print(f"resume: skipping {e} (renamed to {path.name}.bad)", file=sys.stderr, flush=True)
    return None

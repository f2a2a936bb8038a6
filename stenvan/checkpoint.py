"""Self-describing, atomic, verifiable checkpoints.

A checkpoint is one dict (format name and version, config, model, optimizer, scaler, scheduler, progress,
sampler position, RNG states, the dataset's fingerprint) saved with `torch.save`, written to a temp file, read
back and checked against the sha256 of the bytes written, then renamed. The sha256 goes into a sidecar
`<name>.sha256` written after it, so a truncated or corrupted file is detected and skipped on resume (and set
aside as `<name>.bad`). A file without a sidecar (a write killed between the rename and the sidecar, a copy made
without it) is *unverified*: resume passes it over for a verified one (setting it aside as `<name>.unverified`),
and an explicit load warns in one line. `last.pt` is a hard link to the newest checkpoint, verified by that step
file's sidecar. Everything loads with `weights_only=True`. Reading is race-free under a trainer that writes every
step (`read_checkpoint_and_digest`: one open file is checked and loaded). `stenvan.training.checkpoint_writer`
writes these files in the background; `stenvan.training.resume` picks the one to resume from.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

import torch

from stenvan.errors import torch_load_error
from stenvan.shards import atomic_write, sha256_file

FORMAT = "stenvan-checkpoint"
VERSION = 1
STEP_NAME = re.compile(r"^step-(\d{9})\.pt$")
SIDECAR = ".sha256"


def step_path(run_dir: str | os.PathLike, step: int) -> Path:
    """The step checkpoint `<run_dir>/step-<step, 9 digits>.pt`."""
    return Path(run_dir) / f"step-{step:09d}.pt"


def sidecar_path(path: Path) -> Path:
    """Where the sha256 of checkpoint `path` is recorded: `<name>.sha256` beside it."""
    return path.with_name(path.name + SIDECAR)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class _HashingFile:
    """A write-only file that hashes what goes through it (torch.save streams into it: no second copy in memory)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()
        self.error: OSError | None = None  # torch.save reports a failed write as "unexpected pos": keep the cause

    def write(self, data) -> int:
        self.sha256.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_checkpoint_file(state: dict, path: str | os.PathLike) -> Path:
    """Write one tagged checkpoint atomically and verified, then its `.sha256` sidecar.

    The file is streamed to a temp file, synced, read back and compared with the sha256 of the bytes handed to
    the file system; only a file that matches is renamed into place.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            out = _HashingFile(f)
            try:
                torch.save({"format": FORMAT, "version": VERSION, **state}, out)
            except Exception:
                if out.error is not None:  # e.g. a full disk, which torch turns into an "unexpected pos" error
                    raise out.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        digest = out.sha256.hexdigest()
        if sha256_file(tmp) != digest:
            raise CheckpointError(f"{path}: the bytes read back differ from those written; check the disk")
        sidecar.unlink(missing_ok=True)  # a stale hash beside a rewritten file would make it look corrupt
        os.replace(tmp, path)
    except BaseException as e:
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name ours
            e.filename = str(path)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write(sidecar, digest + "\n")
    return path


def save_checkpoint(state: dict, run_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Write `step-<step>.pt` (+ .sha256), point last.pt at it, keep the newest `keep` step files."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = write_checkpoint_file(state, step_path(run_dir, step))
    link_tmp = run_dir / f".last.pt.{os.getpid()}.tmp"
    if link_tmp.exists():
        link_tmp.unlink()
    os.link(path, link_tmp)  # last.pt shares the bytes of the newest step file; the rename is atomic
    os.replace(link_tmp, run_dir / "last.pt")
    for old in step_checkpoints(run_dir)[:-keep]:
        old.unlink()
        sidecar_path(old).unlink(missing_ok=True)
    return path


def step_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Step checkpoints in `run_dir`, oldest first."""
    return sorted(Path(p) for p in glob.glob(os.path.join(run_dir, "step-*.pt")) if STEP_NAME.match(Path(p).name))


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and check one checkpoint file; raises CheckpointError naming the file and the problem. A file without
    a `.sha256` to check it against loads with a one-line warning on stderr (see `read_named_checkpoint`)."""
    return read_named_checkpoint(path, map_location)[0]


def read_named_checkpoint(path: str | os.PathLike, map_location="cpu", prefix: str = "") -> tuple[dict, str]:
    """(state, sha256) of a checkpoint the user named: one that nothing verifies loads (they named it, and copies
    made without the sidecar are common) with a one-line warning on stderr, after `prefix` (e.g. "resume: ")."""
    state, digest, verified = read_checkpoint_and_digest(path, map_location)
    if not verified:
        print(f"{prefix}warning: {unverified_line(path)}", file=sys.stderr, flush=True)
    return state, digest


def unverified_line(path: str | os.PathLike) -> str:
    path = Path(path)
    return (f"{path}: unverified: no {sidecar_path(path).name} beside it to check its bytes against (a copy made "
            "without it, or a write cut short), so a damaged file would load with wrong weights")


def _recorded_digest(path: Path, opened: os.stat_result) -> tuple[str | None, str]:
    """(the sha256 recorded for the file opened as `path`, or None; the sidecar's name, for messages), resolved
    from the opened file itself (its inode), never from whatever the name points to a moment later.

    A step file's sidecar is its own (re-checked: the name must still be the opened file once the sidecar is
    read). `last.pt` has none: it is a hard link to the newest step file, so the step file that is the same inode
    gives it; a trainer that re-points last.pt meanwhile does not matter. A step file set aside as `.bad` that is
    that inode is refused."""
    def same(p: Path) -> bool:
        try:
            st = os.stat(p)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino)

    def read(sidecar: Path) -> str | None:
        try:
            return sidecar.read_text().strip()
        except OSError:
            return None

    own = sidecar_path(path)
    if path.name != "last.pt" or own.exists():
        digest = read(own)
        return (digest if digest is not None and same(path) else None), own.name
    for step in reversed(step_checkpoints(path.parent)):
        if same(step):
            sidecar = sidecar_path(step)
            digest = read(sidecar)
            if digest is not None and same(step):
                return digest, sidecar.name
    for bad in path.parent.glob("step-*.pt.bad"):
        if same(bad):  # resume set its step file aside as damaged; last.pt is that file
            raise CheckpointError(f"{path}: is the same file as {bad.name}, which resume set aside as damaged; "
                                  "use the newest step-*.pt instead")
    return None, own.name


def _sha256_fd(fd: int, chunk_bytes: int = 1 << 22) -> str:
    digest, offset = hashlib.sha256(), 0
    while block := os.pread(fd, chunk_bytes, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def _load(fd: int, path: Path, map_location):
    """torch.load of the open file `fd`: memory-mapped through /proc/self/fd (Linux: the same inode, whatever
    `path` names now), else read from the descriptor."""
    proc = f"/proc/self/fd/{fd}"
    if os.path.exists(proc):
        return torch.load(proc, map_location=map_location, weights_only=True, mmap=True)
    with os.fdopen(os.dup(fd), "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


def read_checkpoint_and_digest(path: str | os.PathLike, map_location="cpu") -> tuple[dict, str, bool]:
    """(state, sha256 of the file, verified): `read_checkpoint` without the warning; verified is False when no
    `.sha256` records what the file must hold (how ranks check that they read the same bytes: the sha256).

    Race-free under a trainer that writes a checkpoint every step: the file is opened once, and the recorded
    sha256, the hash and the load all concern that open file. When `last.pt` moved on before its step file's
    sidecar could be found (the trainer pruned that step file meanwhile), the newer last.pt is read instead."""
    path = Path(path)
    for attempt in range(5):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block: refused below
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointError(f"{path}: checkpoint not found") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be opened ({e.strerror})") from None
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise CheckpointError(f"{path}: not a checkpoint file (a folder or a special file)")
            expected, sidecar_name = _recorded_digest(path, opened)
            if expected is None and path.name == "last.pt" and attempt < 4 and _moved(path, opened):
                continue  # re-pointed (and its step file pruned) while we looked: read the newer one
            digest = _sha256_fd(fd)
            if expected is None and path.name == "last.pt":  # a copy of last.pt: verified if a sidecar records it
                expected = digest if digest in _step_digests(path.parent) else None
            if expected is not None and expected != digest:
                raise CheckpointError(f"{path}: sha256 does not match {sidecar_name}: the file is corrupt or "
                                      "truncated")
            try:
                # Memory-mapped: the tensors are read from the page cache, which the ranks of a node resuming from
                # the same file share, instead of every rank holding the file's bytes and a copy of them.
                state = _load(fd, path, map_location)
            except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
                raise CheckpointError(torch_load_error(path, e, "a stenvan checkpoint", "it is truncated, corrupt or "
                                                       "not a checkpoint train.py wrote")) from None
        finally:
            os.close(fd)
        break
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a stenvan checkpoint (no format tag); an original STE-NVAN .pth is "
                              "evaluated with eval.py --original-arch ARCH")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state.get('version')}, this stenvan reads "
                              f"version {VERSION}")
    return state, digest, expected is not None


def _moved(path: Path, opened: os.stat_result) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return True
    return (st.st_dev, st.st_ino) != (opened.st_dev, opened.st_ino)


def _step_digests(run_dir: Path) -> set[str]:
    return {sidecar_path(p).read_text().strip() for p in step_checkpoints(run_dir) if sidecar_path(p).is_file()}


def newest_valid_checkpoint(run_dir: str | os.PathLike, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest step checkpoint that loads and verifies (see `newest_valid_checkpoint_and_digest`)."""
    found = newest_valid_checkpoint_and_digest(run_dir, map_location)
    return found and found[:2]


def newest_valid_checkpoint_and_digest(run_dir: str | os.PathLike,
                                       map_location="cpu") -> tuple[Path, dict, str] | None:
    """(path, state, sha256) of the newest step checkpoint that loads and verifies against its `.sha256`.

    Damaged files are set aside as `<name>.bad`. Newer files without a `.sha256` (a write cut short between the
    rename and the sidecar, a copy without it) are unverified: passed over for a verified older one and set aside
    as `<name>.unverified`, or, when no checkpoint verifies, the newest of them that loads is used, with a line
    saying so. Set aside, they no longer count among the kept checkpoints nor come back on the next resume.
    Only one process may call this on a run folder at a time (it renames files): in a distributed run, rank 0
    (see `stenvan.training.resume`)."""
    unverified = []
    for path in reversed(step_checkpoints(run_dir)):
        if not sidecar_path(path).is_file():
            unverified.append(path)  # loaded only if nothing verified is found
            continue
        try:
            state, digest, _ = read_checkpoint_and_digest(path, map_location)
        except CheckpointError as e:
            _set_aside(path, ".bad", f"resume: skipping {e}")
            continue
        for newer in unverified:
            _set_aside(newer, ".unverified", f"resume: skipping {unverified_line(newer)}; {path.name} verifies")
        return path, state, digest
    for path in unverified:
        try:
            state, digest, _ = read_checkpoint_and_digest(path, map_location)
        except CheckpointError as e:
            _set_aside(path, ".bad", f"resume: skipping {e}")
            continue
        print(f"resume: warning: no checkpoint in {run_dir} verifies; continuing from {unverified_line(path)}",
              file=sys.stderr, flush=True)
        return path, state, digest
    return None


def _set_aside(path: Path, suffix: str, line: str) -> None:
    """Rename a checkpoint (and its sidecar) to <name><suffix>: kept for inspection, no longer a step checkpoint."""
    os.replace(path, path.with_name(path.name + suffix))
    sidecar = sidecar_path(path)
    if sidecar.exists():
        os.replace(sidecar, sidecar.with_name(sidecar.name + suffix))
    print(f"{line} (renamed to {path.name}{suffix})", file=sys.stderr, flush=True)

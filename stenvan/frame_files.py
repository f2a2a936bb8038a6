"""What counts as a frame file in a folder of raw frames, and how to read one without hanging or lying.

The rules every reader of raw frames follows (prepare's dataset readers through `prepare.tracklet`, embed.py's
tracklet folders through `stenvan.inference.embed`):
- A frame is a regular file, or a symlink to one. A FIFO, a device, a socket or a folder named like a frame is
  refused, naming the frame: opening a FIFO blocks for ever, a symlink to /dev/zero never ends.
- A name in a listing that cannot be examined (a symlink whose target is missing, e.g. on a volume that is not
  mounted; a loop of symlinks; no permission) is reported, never silently dropped: tracklets and identities do
  not vanish from a split without a word.
- A frame is opened without blocking (O_NONBLOCK: a FIFO swapped in after the listing cannot block either),
  checked again on the open descriptor, and read up to the size it has there, never more; a size other than the
  one the listing saw means the file changed while it was read.

Standard library only: prepare's worker processes import it.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple


class FrameFileError(ValueError):
    """A frame or folder entry that is not what it must be; the message names it and says what it is."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_name(mode: int) -> str:
    """'a regular file', 'a folder', 'a FIFO', ... for a stat mode."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _unexaminable(path: str, e: OSError) -> FrameFileError:
    if isinstance(e, FileNotFoundError) and os.path.islink(path):
        return FrameFileError(f"{path}: a symlink to a missing target ({os.readlink(path)}): is a volume not "
                              "mounted?")
    parent = os.path.dirname(path)
    if isinstance(e, FileNotFoundError) and os.path.islink(parent) and not os.path.exists(parent):
        return FrameFileError(f"{path}: its folder {parent} is a symlink to a missing target "
                              f"({os.readlink(parent)}): is a volume not mounted?")
    if isinstance(e, FileNotFoundError):
        return FrameFileError(f"{path}: does not exist")
    return FrameFileError(f"{path}: cannot be examined ({e.strerror or e})")


class Entry(NamedTuple):
    name: str
    path: str
    kind: str  # "folder", "file" (regular), "other" (FIFO, device, socket) or "broken" (cannot be examined)
    problem: str | None  # for "other" and "broken": what it is, naming the path


def list_entries(folder: str) -> list[Entry]:
    """Every entry of `folder`, sorted by name, each examined through its symlinks."""
    entries = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            entries.append(Entry(name, path, "broken", str(_unexaminable(path, e))))
            continue
        if stat.S_ISDIR(mode):
            entries.append(Entry(name, path, "folder", None))
        elif stat.S_ISREG(mode):
            entries.append(Entry(name, path, "file", None))
        else:
            entries.append(Entry(name, path, "other", f"{path}: is {kind_name(mode)}, not a frame file"))
    return entries


def stat_frame(path: str) -> os.stat_result:
    """The stat of a frame file (through a symlink); FrameFileError unless it is a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _unexaminable(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise FrameFileError(f"{path}: is {kind_name(st.st_mode)}, not a frame file")
    return st


def read_frame_bytes(path: str, size: int | None = None) -> bytes:
    """The bytes of a frame file: opened without blocking, a regular file on the open descriptor, read up to
    its size there. `size`: what the listing saw; another size now means the file changed under us."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _unexaminable(path, e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FrameFileError(f"{path}: is {kind_name(st.st_mode)}, not a frame file")
        if size is not None and st.st_size != size:
            raise FrameFileError(f"{path}: now {st.st_size} bytes, {size} when its folder was listed: it changed "
                                 "while being read; rerun once nothing writes the dataset")
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise FrameFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if left:
        raise FrameFileError(f"{path}: ended {left} bytes before its size: it changed while being read; rerun once "
                             "nothing writes the dataset")
    return b"".join(chunks)

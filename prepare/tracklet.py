"""What the dataset readers hand to the shard writer (tracklets with their frames, the error type), and the
rules every reader applies to raw frames (stenvan.frame_files): a frame is a regular file, opened without
blocking and read up to the size the scan saw; an entry that cannot be examined (a symlink to a missing target)
is an error or, with --skip-bad, a skip that says so, never silently dropped. Readers list folders with
`list_entries`, stat frames with `stat_frames`; the writer reads them with `read_frame_file`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from stenvan.frame_files import Entry, FrameFileError, list_entries, read_frame_bytes, stat_frame

__all__ = ["Entry", "FrameFileError", "PrepareError", "Tracklet", "jpeg_problem", "list_entries", "numeric_name",
           "read_frame_file", "stat_frames"]
SKIP_ADVICE = "restore the file or pass --skip-bad to skip its tracklet"


class PrepareError(Exception):
    """Bad input or output for prepare; the message names the file and what to do. Exit code 2."""


@dataclass
class Tracklet:
    key: str  # dot-free, unique within its shard group (e.g. MARS "0001C1T0001", DukeV "0001_C6_T0001")
    group: str  # the shards it goes to: "train", "test" (MARS query + gallery) or "query"/"gallery" (DukeV)
    pid: int  # identity as in the file names: 0 = distractor, -1 = junk (MARS)
    camid: int  # camera, 1-based as in the file names
    frames: list[str]  # source frame paths, in temporal order
    sizes: list[int]  # their sizes in bytes (from stat), used to plan shards
    mtimes: list[int]  # their modification times (ns, from stat): a rerun's quick check for changed input
    splits: tuple[str, ...]  # manifest splits it belongs to: ("train",), ("gallery",), ("query", "gallery"), ...
    flags: dict = field(default_factory=dict)  # "junk", "distractor", "query" markers for evaluation

    def metadata(self, root: str) -> dict:
        """The tracklet's JSON member: everything but shard placement. Paths relative to the dataset root."""
        return {"key": self.key, "pid": self.pid, "camid": self.camid, "num_frames": len(self.frames),
                "frames": [p.rsplit(os.sep, 1)[-1] for p in self.frames],
                "source": relative(os.path.dirname(self.frames[0]), root), **self.flags}


def relative(path: str, root: str) -> str:
    """os.path.relpath(path, root) for a path the readers built as os.path.join(root, ...), without its cost
    (called for every frame of the dataset)."""
    prefix = root.rstrip(os.sep) + os.sep
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)


def stat_frames(paths: list[str]) -> tuple[list[int], list[int]] | str:
    """File sizes and modification times (ns), or a problem string naming the first frame that is missing, not a
    regular file (a folder, a FIFO, a device) or cannot be examined (a symlink to a missing target)."""
    sizes, mtimes = [], []
    for path in paths:
        try:
            st = stat_frame(path)
        except FrameFileError as e:
            return f"{e}; {SKIP_ADVICE}"
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    return sizes, mtimes


def read_frame_file(path: str, size: int) -> tuple[bytes | None, str | None]:
    """(the frame's bytes, None), or (None, a problem naming the frame): read as `stenvan.frame_files` says (a
    regular file, opened without blocking, at most the `size` the scan saw)."""
    try:
        return read_frame_bytes(path, size), None
    except FrameFileError as e:
        return None, f"{e}; {SKIP_ADVICE}"


def numeric_name(name: str, digits: int | None = None) -> bool:
    """An ASCII number (str.isdigit also takes other scripts' digits, which no key may hold), of `digits` digits."""
    return name.isascii() and name.isdigit() and (digits is None or len(name) == digits)


# After a start-of-scan segment: the next marker that is neither a stuffed 0xFF00 nor a restart marker RSTn.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field (TEM, RST0..7)


def jpeg_end(data: bytes) -> int | None:
    """Offset just past the EOI marker, found by walking the marker segments (SOI, headers, scans...), or None
    if the data ends first (truncated) or the structure is broken. Bytes after EOI do not matter, and an EOI
    inside a header segment (an EXIF thumbnail's) is stepped over with its segment."""
    pos, n = 2, len(data)
    while pos + 2 <= n:
        if data[pos] != 0xFF:
            return None
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos + 2 > n:
            return None
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            return pos + 2
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return None
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > n:
            return None
        pos = end
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next real marker
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                return None
            pos = found.start()
    return None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\0\0\0\0IEND\xaeB`\x82"  # the IEND chunk (length 0, type, CRC) that closes every PNG


def frame_ext(data: bytes) -> str | None:
    """The shard member extension for a frame's bytes: "jpg" or "png" (from its signature), None for others."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == PNG_SIGNATURE:
        return "png"
    return None


def frame_problem(data: bytes, path: str) -> str | None:
    """A cheap structural check of a frame (JPEG or PNG, told by its bytes, not its name); the full decode is
    `prepare verify --deep`."""
    if data[:8] == PNG_SIGNATURE:
        if data[12:16] != b"IHDR" or PNG_END not in data[-64:]:
            return (f"{path}: truncated or broken PNG (no IHDR header or no IEND chunk at its end); restore it or "
                    "pass --skip-bad")
        return None
    if data and data[:3] != b"\xff\xd8\xff":
        return (f"{path}: neither a JPEG nor a PNG (by its first bytes); replace the file or pass --skip-bad to skip "
                "its tracklet")
    return jpeg_problem(data, path)


def list_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Names (sorted) of the entries of `folder` whose lower-cased name ends with one of `suffixes`."""
    return sorted(name for name in os.listdir(folder) if name.lower().endswith(suffixes))


def list_folders(path: str) -> list[str]:
    """Names (sorted) of the sub-folders of `path`. An entry that cannot be examined (a symlink to a missing
    target: a volume not mounted) is an error naming it: a person folder never vanishes from a split silently."""
    entries = list_entries(path)
    broken = next((e for e in entries if e.kind == "broken"), None)
    if broken:
        raise PrepareError(f"{broken.problem}; restore it, or move it out of the dataset")
    return [e.name for e in entries if e.kind == "folder"]


def person_folders(path: str, pattern: re.Pattern, missing: str, form: str) -> list[str]:
    """The sub-folders of `path` (sorted), all named as `pattern` says; PrepareError(`missing`) without `path`."""
    if not os.path.isdir(path):
        raise PrepareError(f"{path}: {missing}")
    names = list_folders(path)
    for name in names:
        if not pattern.match(name):
            raise PrepareError(f"{os.path.join(path, name)}: not a {form} folder; move it out of the dataset")
    return names


def numbered_frames(folder: str, pattern: re.Pattern, form: str) -> tuple[list[str] | None, str | None]:
    """(the PNG frames of `folder` in frame-number order, None) or (None, a problem line). `pattern`'s first group
    is a frame's number; `form` names the expected file name in the problem line."""
    files = list_files(folder, (".png",))
    if not files:
        return None, f"{folder}: holds no PNG frames; restore the sequence"
    parsed = [pattern.match(f) for f in files]
    if not all(parsed):
        bad = files[[m is None for m in parsed].index(True)]
        return None, f"{os.path.join(folder, bad)}: not a frame of this sequence ({form}); move it out of the dataset"
    order = sorted((int(m.group(1)), f) for m, f in zip(parsed, files))
    if len({n for n, _ in order}) != len(order):
        return None, f"{folder}: two frames carry the same frame number; restore the sequence"
    return [os.path.join(folder, f) for _, f in order], None


def jpeg_problem(data: bytes, path: str) -> str | None:
    """A cheap structural check of a JPEG file's bytes; the full decode is `prepare verify --deep`."""
    if not data:
        return f"{path}: zero-byte frame; restore the file or pass --skip-bad to skip its tracklet"
    if data[:3] != b"\xff\xd8\xff":
        return f"{path}: not a JPEG (no SOI marker); replace the file or pass --skip-bad to skip its tracklet"
    # Fast path: nearly every file ends with its EOI marker (zero padding allowed); otherwise walk the markers
    # to tell bytes appended after EOI (fine) from a file cut short (refused).
    if not data.endswith(b"\xff\xd9") and data.rstrip(b"\0")[-2:] != b"\xff\xd9" and jpeg_end(data) is None:
        return f"{path}: truncated JPEG (it ends before its EOI marker); restore it or pass --skip-bad"
    return None

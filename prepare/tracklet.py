"""What the dataset readers hand to the shard writer: tracklets with their frames, and the error type."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


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
    splits: tuple[str, ...]  # manifest splits it belongs to: ("train",), ("gallery",), ("query", "gallery"), ...
    flags: dict = field(default_factory=dict)  # "junk", "distractor", "query" markers for evaluation

    def metadata(self, root: str) -> dict:
        """The tracklet's JSON member: everything but shard placement. Paths relative to the dataset root."""
        return {"key": self.key, "pid": self.pid, "camid": self.camid, "num_frames": len(self.frames),
                "frames": [os.path.basename(p) for p in self.frames],
                "source": os.path.relpath(os.path.dirname(self.frames[0]), root), **self.flags}


def stat_frames(paths: list[str]) -> list[int] | str:
    """File sizes, or a problem string naming the first missing file."""
    sizes = []
    for path in paths:
        try:
            sizes.append(os.stat(path).st_size)
        except FileNotFoundError:
            return f"{path}: listed frame does not exist; restore the file or pass --skip-bad to skip its tracklet"
    return sizes


def jpeg_problem(data: bytes, path: str) -> str | None:
    """A cheap structural check of a JPEG file's bytes; the full decode is `prepare verify --deep`."""
    if not data:
        return f"{path}: zero-byte frame; restore the file or pass --skip-bad to skip its tracklet"
    if data[:3] != b"\xff\xd8\xff":
        return f"{path}: not a JPEG (no SOI marker); replace the file or pass --skip-bad to skip its tracklet"
    if data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return f"{path}: truncated JPEG (no EOI marker at the end); restore it or pass --skip-bad"
    return None

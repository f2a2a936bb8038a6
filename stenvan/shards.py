"""The stenvan shard format (version 1): tar layout, DALI-compatible index files and the manifest.

This module is shared by the writer (`prepare/`) and the readers (`stenvan.data`), so it imports nothing
heavier than the standard library. The specification lives in `shards/FORMAT.md`; keep the two in step.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORMAT_NAME = "stenvan-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_VERSION = "v1.2"  # DALI's wds2idx index format: "v1.2 N", then "ext offset size name ..." per sample
BLOCK = 512  # tar block size
SPLITS = ("train", "query", "gallery")
FRAME_DIGITS = 5  # member "<key>.<frame:05d>.jpg": up to 99,999 frames per tracklet


class ShardFormatError(Exception):
    """A shard directory that does not match the format; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Tar members
# ----------------------------------------------------------------------------------------------------------

def frame_member(key: str, frame: int) -> str:
    """Tar member name of frame `frame` (0-based) of tracklet `key`."""
    return f"{key}.{frame:0{FRAME_DIGITS}d}.jpg"


def tar_header(name: str, size: int) -> bytes:
    """A normalised POSIX ustar header for a regular file: mode 0644, uid/gid 0, no owner names, mtime 0.

    Normalising every field that could carry the writer's environment makes shards byte-identical across
    machines and runs.
    """
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    header = bytearray(BLOCK)
    header[0:len(raw)] = raw
    header[100:108] = b"0000644\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = f"{size:011o}\0".encode()  # size, octal
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # checksum is computed with this field as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"  # POSIX ustar magic + version
    checksum = sum(header)
    header[148:156] = f"{checksum:06o}\0 ".encode()
    return bytes(header)


def padded(size: int) -> int:
    """Bytes a member's data occupies in the tar, padded to whole blocks."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


def member_span(size: int) -> int:
    """Bytes a member occupies in the tar: header + padded data."""
    return BLOCK + padded(size)


TAR_END = bytes(2 * BLOCK)  # two zero blocks end a tar archive


# ----------------------------------------------------------------------------------------------------------
# Index files (DALI's `.idx`, so `fn.readers.webdataset` reads the shards without inferring an index)
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexedMember:
    ext: str  # e.g. "json" or "00003.jpg"
    offset: int  # byte offset of the member's data (not its header) in the tar
    size: int  # data size in bytes
    name: str  # full member name


def format_index(samples: list[list[IndexedMember]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in members))
    return "\n".join(lines) + "\n"


def read_index(path: str | os.PathLike) -> list[list[IndexedMember]]:
    """Parse a `.idx` file into samples, each a list of its members in tar order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: index file missing; rerun `python -m prepare ...` on the dataset") from None
    except UnicodeDecodeError:
        raise ShardFormatError(f"{path}: index file is not ASCII text; it is corrupt, rerun prepare") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardFormatError(f"{path}: first line must be '{INDEX_VERSION} <samples>', got {lines[:1]}")
    if int(head[1]) != len(lines) - 1:
        raise ShardFormatError(f"{path}: header says {head[1]} samples but the file has {len(lines) - 1} lines")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ShardFormatError(f"{path}:{lineno}: expected groups of 'ext offset size name'")
        try:
            samples.append([IndexedMember(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                            for i in range(0, len(fields), 4)])
        except ValueError:
            raise ShardFormatError(f"{path}:{lineno}: offset and size must be integers") from None
    return samples


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so a reader or a
    killed writer never sees a half-written file."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the result is an ordinary shared file
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def dump_json(obj) -> str:
    """The one JSON encoding used for manifests and metadata: sorted keys, so output is byte-stable."""
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def load_manifest(directory: str | os.PathLike) -> dict:
    """Load and check `manifest.json` of a prepared dataset directory."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise ShardFormatError(f"{directory}: no such directory; prepare the dataset with `python -m prepare ...`")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: missing; `python -m prepare` writes it last, so the dataset is not "
                               "fully prepared: rerun the same prepare command to finish it") from None
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e}); rerun prepare") from None
    if manifest.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: shard format version {manifest.get('version')!r}, this stenvan reads "
                               f"version {FORMAT_VERSION}; re-prepare the dataset with this version")
    return manifest

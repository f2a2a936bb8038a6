"""The stenvan shard format (versions 2 and 3): tar layout, DALI-compatible index files and the manifest.

This module is shared by the writer (`prepare/`) and the readers (`stenvan.data`), so it imports nothing
heavier than the standard library. The specification lives in `shards/FORMAT.md`; keep the two in step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import NamedTuple

FORMAT_NAME = "stenvan-shards"
FORMAT_VERSION = 3  # the newest version this code writes and reads
# Version 3 adds PNG frame members, the datasets iLIDS-VID, PRID-2011 and LS-VID, person splits and LS-VID's val
# split. A dataset that uses none of these (MARS or DukeV of JPEG frames) is still written as version 2, byte for
# byte as before (so its fingerprint, and the checkpoints that recorded it, stay valid); readers read both.
READ_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
INDEX_VERSION = "v1.2"  # DALI's wds2idx index format: "v1.2 N", then "ext offset size name ..." per sample
BLOCK = 512  # tar block size
SPLITS = ("train", "query", "gallery")  # the manifest splits of every dataset (LS-VID adds "val")
FRAME_DIGITS = 5  # member "<key>.<frame:05d>.<ext>": up to 99,999 frames per tracklet
FRAME_EXTS = ("jpg", "png")  # a frame member's extension: the format of its bytes (original bytes, never re-encoded)
SHARD_NAME = re.compile(r"^(train|test|query|gallery|val|all)-\d{5}\.(tar|idx)$")
# The shard groups of each dataset, and the group whose shards hold each manifest split. iLIDS-VID and PRID-2011
# keep every tracklet once, in the group "all": a person split decides which are train, query and gallery.
SPLIT_GROUPS = {"mars": {"train": "train", "query": "test", "gallery": "test"},
                "dukev": {"train": "train", "query": "query", "gallery": "gallery"},
                "ilidsvid": {"train": "all", "query": "all", "gallery": "all"},
                "prid2011": {"train": "all", "query": "all", "gallery": "all"},
                "lsvid": {"train": "train", "query": "test", "gallery": "test", "val": "val"}}
VERSION_2_DATASETS = ("mars", "dukev")  # the datasets a version-2 manifest may describe
PERSON_SPLIT_DATASETS = ("ilidsvid", "prid2011")  # datasets evaluated over person splits (10, numbered 0..9)
NUM_PERSON_SPLITS = 10


class ShardFormatError(Exception):
    """A shard directory that does not match the format; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Tar members
# ----------------------------------------------------------------------------------------------------------

_NOT_IN_KEYS = re.compile(r"[./\\\s]")
KEY_CHARS = 80  # "<key>.<FFFFF>.jpg" stays within a tar header's 100-byte name field


def plain_key(key) -> bool:
    """A tracklet key is a plain name: printable ASCII without a dot (the extension starts at the first dot),
    a slash, a backslash or a space, at most KEY_CHARS long. Member names built from it (`<key>.json`,
    `<key>.<FFFFF>.jpg`) are then plain file names that no tool extracts outside its folder."""
    return (isinstance(key, str) and 0 < len(key) <= KEY_CHARS and key.isascii() and key.isprintable()
            and not _NOT_IN_KEYS.search(key))


def plain_shard_names(name, index) -> bool:
    """`name` is a shard's plain file name of this folder (`<group>-NNNNN.tar`) and `index` its `.idx`."""
    return (isinstance(name, str) and isinstance(index, str) and bool(SHARD_NAME.match(name))
            and name.endswith(".tar") and index == name[:-4] + ".idx")


def frame_member(key: str, frame: int, ext: str = "jpg") -> str:
    """Tar member name of frame `frame` (0-based) of tracklet `key`, whose bytes are a `ext` file (FRAME_EXTS)."""
    return f"{key}.{frame:0{FRAME_DIGITS}d}.{ext}"


def split_names(dataset: str) -> tuple[str, ...]:
    """The manifest splits of a dataset: train, query, gallery (and LS-VID's val)."""
    return tuple(SPLIT_GROUPS[dataset])


def manifest_version(dataset: str, exts) -> int:
    """The version a writer stamps: 2 for MARS/DukeV of JPEG frames only (unchanged bytes), else 3."""
    return 2 if dataset in VERSION_2_DATASETS and set(exts) <= {"jpg"} else 3


# The fields of a header that never change (mode, uid/gid, mtime, type, ustar magic), and what they add to
# the checksum (computed with the checksum field itself as 8 spaces).
_MODE_UID_GID = b"0000644\0" + b"0000000\0" * 2  # bytes 100-124
_MTIME = b"00000000000\0"  # 136-148
_TYPE_TO_END = b"0" + bytes(100) + b"ustar\x0000" + bytes(BLOCK - 265)  # 156-512: type, linkname, magic, rest
_CONSTANT_SUM = sum(_MODE_UID_GID) + sum(_MTIME) + 8 * ord(" ") + sum(_TYPE_TO_END)


def tar_header(name: str, size: int) -> bytes:
    """A normalised POSIX ustar header for a regular file: mode 0644, uid/gid 0, no owner names, mtime 0.

    Normalising every field that could carry the writer's environment makes shards byte-identical across
    machines and runs. Built from constant pieces (it runs once per frame).
    """
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    size_field = b"%011o\0" % size
    checksum = _CONSTANT_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, bytes(100 - len(raw)), _MODE_UID_GID, size_field, _MTIME, b"%06o\0 " % checksum,
                     _TYPE_TO_END))


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

class IndexedMember(NamedTuple):  # a NamedTuple: built once per frame by the writer and the readers
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

def atomic_write(path: str | os.PathLike, data: bytes | str, tmp_dir: str | os.PathLike | None = None) -> None:
    """Write `data` to `path` through a temporary file and a rename, so a reader or a killed writer never sees
    a half-written file. The temporary file goes to `tmp_dir` (same filesystem) or beside `path`."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the result is an ordinary shared file
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name ours
            e.filename = str(path)
        with contextlib.suppress(FileNotFoundError):
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


# ----------------------------------------------------------------------------------------------------------
# The manifest: content hash, fingerprint, structure
# ----------------------------------------------------------------------------------------------------------

def _canonical(obj) -> bytes:
    """The encoding that hashes cover: compact JSON with sorted keys (json's C encoder: fast on MARS's manifest)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's body: everything but the `manifest_sha256` field, canonically encoded."""
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest with its `manifest_sha256` set (the writer's last step before writing it)."""
    return {**manifest, "manifest_sha256": manifest_sha256(manifest)}


def dataset_fingerprint(manifest: dict) -> str:
    """A stable identity of a prepared dataset: sha256 of its manifest without `writer` and `manifest_sha256`.

    It covers every shard's sha256, every split, label and skipped tracklet, so two folders get the same
    fingerprint exactly when they hold the same dataset (the same input prepared anywhere, by any stenvan that
    writes the same bytes). Pass a manifest from `load_manifest`.
    """
    body = {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "writer")}
    return hashlib.sha256(_canonical(body)).hexdigest()


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "true or false"}
_TOP_FIELDS = {"dataset": str, "writer": str, "shards": list, "splits": dict, "skipped": list, "manifest_sha256": str}
_SHARD_FIELDS = {"name": str, "index": str, "group": str, "sha256": str, "bytes": int, "index_sha256": str,
                 "num_tracklets": int, "num_frames": int, "plan_sha256": str}
_SPLIT_FIELDS = {"num_ids": int, "num_tracklets": int, "num_frames": int, "tracklets": list}
_ENTRY_FIELDS = {"key": str, "pid": int, "camid": int, "num_frames": int, "shard": str, "sample": int}
_SKIPPED_FIELDS = {"key": str, "group": str, "reason": str}


def _check_fields(obj, fields: dict, where: str, bad) -> None:
    if not isinstance(obj, dict):
        raise bad(f"{where} is {_KIND_NAMES.get(type(obj), type(obj).__name__)}, expected an object")
    for name, kind in fields.items():
        if name not in obj:
            raise bad(f"{where} lacks the field {name!r}")
        value = obj[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise bad(f"{where}.{name} is {value!r}, expected {_KIND_NAMES[kind]}")


def check_manifest(manifest, path: str | os.PathLike) -> None:
    """Raise ShardFormatError naming `path` unless `manifest` has the structure and content hash of the format."""
    if not isinstance(manifest, dict):
        raise ShardFormatError(f"{path}: holds a JSON {type(manifest).__name__}, not a stenvan manifest (an object);"
                               " rerun the prepare command that wrote this folder")
    if manifest.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("version")
    if version not in READ_VERSIONS:
        raise ShardFormatError(f"{path}: shard format version {version!r}, this stenvan reads versions "
                               f"{' and '.join(map(str, READ_VERSIONS))}; re-prepare the dataset with this version "
                               "(into a new folder, or delete this one first)")

    def bad(what: str) -> ShardFormatError:
        return ShardFormatError(f"{path}: {what}; the manifest is damaged or was edited: rerun the prepare command "
                                "that wrote it (it restores the manifest), or prepare the dataset again")

    _check_fields(manifest, _TOP_FIELDS, "the manifest", bad)
    datasets = VERSION_2_DATASETS if version == 2 else tuple(SPLIT_GROUPS)
    if manifest["dataset"] not in datasets:
        raise bad(f"dataset is {manifest['dataset']!r}, expected one of {sorted(datasets)} (format version {version})")
    groups = SPLIT_GROUPS[manifest["dataset"]]
    for i, shard in enumerate(manifest["shards"]):
        _check_fields(shard, _SHARD_FIELDS, f"shards[{i}]", bad)
        name = shard["name"]
        # Names are plain file names of this folder: never a path that could point elsewhere.
        if not plain_shard_names(name, shard["index"]) or not name.startswith(shard["group"] + "-") \
                or shard["group"] not in groups.values():
            raise bad(f"shards[{i}] is {name!r} / {shard['index']!r} in group {shard['group']!r}, not a "
                      f"{manifest['dataset']} shard name")
    for split in groups:
        if split not in manifest["splits"]:
            raise bad(f"split {split!r} missing")
    if set(manifest["splits"]) - set(groups):
        raise bad(f"splits {sorted(set(manifest['splits']) - set(groups))} are not {manifest['dataset']} splits")
    for split in groups:
        info = manifest["splits"][split]
        _check_fields(info, _SPLIT_FIELDS, f"splits.{split}", bad)
        fields = {**_ENTRY_FIELDS, "label": int} if split == "train" else _ENTRY_FIELDS
        for j, entry in enumerate(info["tracklets"]):
            _check_fields(entry, fields, f"splits.{split}.tracklets[{j}]", bad)
            if not plain_key(entry["key"]):  # member names are built from it: never a path
                raise bad(f"splits.{split}.tracklets[{j}].key is {entry['key'][:100]!r}, not a plain tracklet key")
    _check_fields(manifest["splits"]["train"], {"labels": dict}, "splits.train", bad)
    _check_person_splits(manifest, bad)
    for j, entry in enumerate(manifest["skipped"]):
        _check_fields(entry, _SKIPPED_FIELDS, f"skipped[{j}]", bad)
    if manifest["manifest_sha256"] != manifest_sha256(manifest):
        raise ShardFormatError(f"{path}: its content does not match its manifest_sha256 (the file was edited or "
                               "damaged after prepare wrote it); rerun the prepare command that wrote it (it "
                               "restores the manifest), or prepare the dataset again")


def _check_person_splits(manifest: dict, bad) -> None:
    """iLIDS-VID and PRID-2011 carry their 10 person splits (lists of pids) and where they came from; no other
    dataset has them."""
    if manifest["dataset"] not in PERSON_SPLIT_DATASETS:
        if "person_splits" in manifest:
            raise bad(f"a {manifest['dataset']} manifest has no person_splits")
        return
    _check_fields(manifest, {"person_splits": list, "person_splits_source": str}, "the manifest", bad)
    if len(manifest["person_splits"]) != NUM_PERSON_SPLITS:
        raise bad(f"person_splits holds {len(manifest['person_splits'])} splits, expected {NUM_PERSON_SPLITS}")
    for i, split in enumerate(manifest["person_splits"]):
        _check_fields(split, {"train": list, "test": list}, f"person_splits[{i}]", bad)
        for part in ("train", "test"):
            if not all(isinstance(p, int) and not isinstance(p, bool) for p in split[part]):
                raise bad(f"person_splits[{i}].{part} must be a list of integer pids")


# ----------------------------------------------------------------------------------------------------------
# Checks that the content hash cannot make: it is an unkeyed sha256, so it detects damage and edits made without
# recomputing it, not an edit whose hash was recomputed. Readers check what is cheap against the shards.
# ----------------------------------------------------------------------------------------------------------

MEMBER_FLAGS = ("query", "junk", "distractor")


def label_problems(train: dict) -> list[str]:
    """Train labels must be 0..n-1 in ascending pid order, the same in `labels` and in every entry: a label of
    99 among 10 identities would silently build a classifier of 100 classes."""
    expected = {pid: label for label, pid in enumerate(sorted({e["pid"] for e in train["tracklets"]}))}
    problems = []
    if train["labels"] != {str(pid): label for pid, label in expected.items()}:
        problems.append("train.labels is not the ascending-pid numbering 0..n-1 of the train identities")
    wrong = [e["key"] for e in train["tracklets"] if e["label"] != expected[e["pid"]]]
    if wrong:
        problems.append(f"train tracklets {wrong[:3]} carry labels that do not follow their pids")
    return problems


def member_differences(entry: dict, meta: dict) -> list[str]:
    """How a manifest entry differs from its tracklet's JSON member in the shard (key, pid, camera, frame count,
    query/junk/distractor marks): e.g. ["pid 99 (shard: 17)"]."""
    differ = [f"{f} {entry.get(f)!r} (shard: {meta.get(f)!r})" for f in ("key", "pid", "camid", "num_frames")
              if meta.get(f) != entry.get(f)]
    return differ + [f"{f} {bool(entry.get(f))} (shard: {bool(meta.get(f))})" for f in MEMBER_FLAGS
                     if bool(meta.get(f)) != bool(entry.get(f))]


def member_name_problem(name: str) -> str | None:
    """Why a tar member name is not one prepare writes (a plain `<key>.json` / `<key>.<FFFFF>.<ext>` file name),
    or None. An absolute name or one with '..' makes tools that extract the tar write outside their folder."""
    if name.startswith("/"):
        return "is absolute: tools extracting the tar would write it outside their folder"
    if ".." in name.split("/"):
        return "climbs out with '..': tools extracting the tar would write it outside their folder"
    if "/" in name or "\\" in name or not plain_key(name.split(".", 1)[0]):
        return "is not a plain file name of the format (<key>.json, <key>.<FFFFF>.jpg|png)"
    return None


# What the top of each raw dataset folder holds (the layouts `python -m prepare <reader>` reads).
RAW_LAYOUTS = (("mars", {"bbox_train", "bbox_test"}), ("dukev", {"train", "query", "gallery"}),
               ("ilidsvid", {"i-LIDS-VID"}), ("ilidsvid", {"ilids-vid"}), ("prid2011", {"prid_2011"}),
               ("lsvid", {"list_sequence", "tracklet_test"}))


def raw_dataset(directory: str | os.PathLike) -> str | None:
    """The prepare reader whose raw layout `directory` has (mars, dukev, ilidsvid, prid2011, lsvid), or None."""
    try:
        names = set(os.listdir(directory))
    except OSError:
        return None
    return next((reader for reader, top in RAW_LAYOUTS if top <= names), None)


def _no_manifest(directory: Path) -> str:
    """Why a folder has no manifest: an unfinished prepare (its records are there), a raw dataset, or neither."""
    path = directory / MANIFEST
    if (directory / ".prepare").is_dir():
        return (f"{path}: missing; `python -m prepare` writes it last, so the dataset is not fully prepared: rerun "
                "the same prepare command to finish it")
    raw = raw_dataset(directory)
    if raw:
        return (f"{directory}: a raw {raw} dataset folder, not a prepared one (no {MANIFEST}); prepare it first: "
                f"python -m prepare {raw} --data-dir {directory} --out shards/{raw}")
    return (f"{directory}: not a prepared dataset (no {MANIFEST}, no prepare records); pass a folder written by "
            "`python -m prepare mars|dukev|ilidsvid|prid2011|lsvid ... --out DIR`")


def load_manifest(directory: str | os.PathLike) -> dict:
    """Load and check `manifest.json` of a prepared dataset directory (structure and content hash)."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise ShardFormatError(f"{directory}: no such directory; prepare the dataset with `python -m prepare ...`")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardFormatError(_no_manifest(Path(directory))) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e}); rerun prepare") from None
    except OSError as e:
        raise ShardFormatError(f"{path}: cannot be read ({e.strerror})") from None
    check_manifest(manifest, path)
    return manifest

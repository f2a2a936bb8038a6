"""The tracklet table: every tracklet of a split with its labels and where each of its frames lies in the shards.

Built from `manifest.json` and the shards' `.idx` files (shards/FORMAT.md); the tars themselves are never parsed.
Frames are read by (shard, offset, size) with `pread` from files that each process opens once (`FrameStore`),
checked on every read against a shard changed under a running job.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stenvan.person_splits import Split, check_split, entries
from stenvan.shards import (BLOCK, FRAME_EXTS, ShardFormatError, frame_member, label_problems, load_manifest,
                            member_differences, read_index, split_names)


@dataclass(frozen=True)
class Tracklet:
    key: str  # e.g. "0001C1T0001" (MARS) or "0001_C6_T0001" (DukeV); unique within the split
    pid: int  # identity as in the file names: 0 distractor, -1 junk (MARS)
    camid: int  # 1-based camera
    label: int  # training label 0..num_ids-1; -1 outside the train split
    num_frames: int
    shard: str  # shard file name, relative to the dataset folder
    sample: int  # sample number in the shard (line of the .idx)
    query: bool = False  # gallery flags from the manifest (False where the split has none)
    junk: bool = False
    distractor: bool = False


FRAME_EXT_AT = len("00000.")  # a frame member's index extension is "<FFFFF>.<jpg|png>"


class ShardChangedError(ShardFormatError):
    """A shard that was truncated, overwritten, replaced or deleted while a job reads it; the message names it."""


def _changed(path: str, what: str) -> ShardChangedError:
    return ShardChangedError(f"{path}: {what} while this job reads it (another `prepare` into the folder?); "
                             "restore the shard (rerun prepare), then resume the run")


class FrameStore:
    """Reads tar members by (shard id, offset, size) with `pread`, from files each process opens once.

    Not memory maps: reading a mapped page past the end of a file that shrank under the job kills the process
    with SIGBUS, while `pread` just returns fewer bytes. Every read checks that the shard is still the file the
    table was built from (same inode, the manifest's size: a stat of the path, ~1 µs against ~100 µs to decode
    the frame) and that the tar header in front of the member names it with its size, so a shard truncated,
    overwritten in place, replaced or deleted under a running job ends in a `ShardChangedError` naming it,
    never in wrong pixels, a decoder's error or a SIGBUS.

    Picklable (a spawned worker reopens the files); `pread` has no file position, so a forked worker may share
    its parent's open files.
    """

    def __init__(self, paths: list[str], sizes: list[int], inodes: list[tuple[int, int]]):
        self.paths, self.sizes, self.inodes = list(paths), list(sizes), list(inodes)
        self._files: dict[int, object] = {}

    def __getstate__(self):
        return {"paths": self.paths, "sizes": self.sizes, "inodes": self.inodes}

    def __setstate__(self, state):
        self.__init__(state["paths"], state["sizes"], state["inodes"])

    def check(self, shard: int) -> None:
        """Raise ShardChangedError unless shard `shard` is still the file of the manifest's size the table saw."""
        path = self.paths[shard]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise _changed(path, "shard deleted") from None
        if (st.st_dev, st.st_ino) != tuple(self.inodes[shard]):
            raise _changed(path, "shard replaced by another file")
        if st.st_size != self.sizes[shard]:
            raise _changed(path, f"shard now {st.st_size} bytes, the manifest says {self.sizes[shard]}: truncated or "
                           "rewritten")

    def _file(self, shard: int):
        f = self._files.get(shard)
        if f is None:
            self.check(shard)
            try:
                f = open(self.paths[shard], "rb", buffering=0)
            except FileNotFoundError:
                raise _changed(self.paths[shard], "shard deleted") from None
            self._files[shard] = f
        return f

    def read(self, shard: int, offset: int, size: int, member: str | None = None) -> np.ndarray:
        """The bytes of the member at `offset` (its data, after its tar header) as a read-only uint8 array.

        Checks the shard (see the class) and the member's tar header: its size, and its name if `member` is given.
        """
        f = self._file(shard)
        self.check(shard)
        path = self.paths[shard]
        data = os.pread(f.fileno(), BLOCK + size, offset - BLOCK)  # the header, then the data
        if len(data) < BLOCK + size:
            raise _changed(path, f"shard ends before byte {offset + size}: truncated")
        name = data[:100].split(b"\0", 1)[0]
        try:
            stored = int(data[124:135], 8)
        except ValueError:
            stored = -1
        if stored != size or (member is not None and name != member.encode()):
            raise _changed(path, f"no tar header of {member or 'a member'} ({size} bytes) at byte {offset - BLOCK}: "
                           "shard overwritten")
        return np.frombuffer(data, dtype=np.uint8, offset=BLOCK)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


class TrackletTable:
    """Tracklets of one split, in manifest order, and the location of every frame.

    `tracklets[i]` describes tracklet i; its frames are `frame_shard[i]`, `frame_offsets[starts[i]:starts[i+1]]`
    and `frame_sizes[...]` (CSR layout: one array for the whole split, cheap to pickle into workers).
    """

    def __init__(self, directory: Path, split: str, dataset: str, tracklets: list[Tracklet], num_ids: int,
                 shard_paths: list[str], shard_of: np.ndarray, starts: np.ndarray, offsets: np.ndarray,
                 sizes: np.ndarray, json_locs: np.ndarray, shard_bytes: list[int],
                 shard_inodes: list[tuple[int, int]], frame_exts: np.ndarray | None = None,
                 person_split: Split = None):
        self.directory, self.split, self.dataset = directory, split, dataset
        self.tracklets, self.num_ids = tracklets, num_ids
        self.shard_paths = shard_paths  # absolute paths; index = shard id
        self.shard_bytes = shard_bytes  # each shard's size in the manifest
        self.shard_inodes = shard_inodes  # (st_dev, st_ino) of each shard when the table was built
        self.shard_of = shard_of  # (N,) int32 shard id of each tracklet
        self.starts = starts  # (N+1,) int64
        self.frame_offsets, self.frame_sizes = offsets, sizes  # (total frames,) int64
        # (total frames,) uint8: each frame member's extension, an index into FRAME_EXTS (JPEG or PNG bytes)
        self.frame_exts = np.zeros(len(offsets), dtype=np.uint8) if frame_exts is None else frame_exts
        self.person_split = person_split  # the person split the tracklets were chosen for (None: all of them)
        self.json_locs = json_locs  # (N, 2) int64: offset, size of each tracklet's JSON member
        self.labels = np.array([t.label for t in tracklets], dtype=np.int64)
        self.pids = np.array([t.pid for t in tracklets], dtype=np.int64)
        self.camids = np.array([t.camid for t in tracklets], dtype=np.int64)
        self.num_frames = np.diff(starts)

    def __len__(self) -> int:
        return len(self.tracklets)

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.tracklets]

    def store(self) -> FrameStore:
        return FrameStore(self.shard_paths, self.shard_bytes, self.shard_inodes)

    def check_shards(self) -> None:
        """Raise ShardChangedError naming the first shard that is no longer the file the table was built from."""
        store = self.store()
        for shard in range(len(self.shard_paths)):
            store.check(shard)

    def frame_locations(self, index: int, frames) -> list[tuple[int, int, int, str]]:
        """(shard id, offset, size, member name) of the given frames (0-based) of tracklet `index`:
        `store.read(*location)` reads one."""
        base, shard, key = self.starts[index], int(self.shard_of[index]), self.tracklets[index].key
        return [(shard, int(self.frame_offsets[base + f]), int(self.frame_sizes[base + f]),
                 frame_member(key, f, FRAME_EXTS[self.frame_exts[base + f]])) for f in frames]

    def metadata(self, index: int, store: FrameStore | None = None) -> dict:
        """The tracklet's JSON member (original frame names, `source` folder, ...)."""
        store = store or self.store()
        offset, size = self.json_locs[index]
        member = f"{self.tracklets[index].key}.json"
        return json.loads(store.read(int(self.shard_of[index]), int(offset), int(size), member).tobytes())

    def read_frames(self, index: int, store: FrameStore | None = None) -> list[bytes]:
        """The encoded frames of tracklet `index` (their original bytes), in temporal order."""
        store = store or self.store()
        return [store.read(*location).tobytes() for location in
                self.frame_locations(index, range(int(self.num_frames[index])))]

    @classmethod
    def from_dir(cls, shard_dir: str | os.PathLike, split: str, person_split: Split = None,
                 manifest: dict | None = None) -> "TrackletTable":
        """Read `manifest.json` (unless `manifest`, loaded by `load_manifest` from this folder, is given) and the
        `.idx` files of the shards the split uses, checking them on the way.

        `person_split` (iLIDS-VID, PRID-2011: 0..9) narrows the split to that person split's tracklets and numbers
        the train labels over its train persons (stenvan.person_splits); None takes the manifest split whole.
        Raises ShardFormatError naming the file for: a missing manifest/shard/index, a format version this code
        does not read, a shard whose size disagrees with the manifest, or an index that disagrees with it.
        """
        directory = Path(shard_dir)
        manifest = manifest if manifest is not None else load_manifest(directory)
        manifest_path = directory / "manifest.json"
        if split not in split_names(manifest["dataset"]):
            raise ValueError(f"split={split!r} is not valid for {manifest['dataset']}; use one of "
                             f"{', '.join(map(repr, split_names(manifest['dataset'])))}")
        if isinstance(person_split, int):
            check_split(manifest, person_split)
        shards = {s["name"]: s for s in manifest["shards"]}
        rows = entries(manifest, split, person_split)

        # Each shard the split uses: present, of the manifest's size, with an index that matches it.
        shard_ids: dict[str, int] = {}
        indexes = []
        for row in rows:
            name = row["shard"]
            if name in shard_ids:
                continue
            if name not in shards:
                raise ShardFormatError(f"{manifest_path}: tracklet {row['key']} names shard {name!r}, which the "
                                       "manifest does not list; rerun prepare")
            path = directory / name
            if not path.is_file():
                raise ShardFormatError(f"{path}: shard missing; rerun `python -m prepare ...` on the dataset "
                                       "(it keeps the shards that are intact and rewrites the rest)")
            st = path.stat()
            actual, expected = st.st_size, shards[name]["bytes"]
            if actual != expected:
                raise ShardFormatError(f"{path}: {actual} bytes but the manifest says {expected}; the shard is "
                                       "truncated or was replaced: rerun prepare")
            idx_path = directory / shards[name]["index"]
            index = read_index(idx_path)
            if len(index) != shards[name]["num_tracklets"]:
                raise ShardFormatError(f"{idx_path}: {len(index)} samples but the manifest says "
                                       f"{shards[name]['num_tracklets']} for {name}; rerun prepare")
            shard_ids[name] = len(indexes)
            indexes.append((idx_path, expected, index, (st.st_dev, st.st_ino)))

        tracklets, shard_of, starts, offsets, sizes, json_locs, exts = [], [], [0], [], [], [], []
        for row in rows:
            sid = shard_ids[row["shard"]]
            idx_path, shard_bytes, index, _ = indexes[sid]
            key, n, sample = row["key"], row["num_frames"], row["sample"]
            if not 0 <= sample < len(index):
                raise ShardFormatError(f"{idx_path}: no sample {sample} for tracklet {key}; rerun prepare")
            members = index[sample]
            names = [m.name for m in members]
            frame_exts = [FRAME_EXTS.index(m.ext[FRAME_EXT_AT:]) if m.ext[FRAME_EXT_AT:] in FRAME_EXTS else 0
                          for m in members[1:]]
            if len(members) != n + 1 or names[0] != f"{key}.json" or \
                    any(names[i + 1] != frame_member(key, i, FRAME_EXTS[e]) for i, e in enumerate(frame_exts)):
                raise ShardFormatError(f"{idx_path}: sample {sample} holds {names[:2]}... ({len(members)} members),"
                                       f" expected {key}.json and {n} frames of {key}; index and manifest disagree,"
                                       " rerun prepare")
            end = max(m.offset + m.size for m in members)
            if end > shard_bytes:
                raise ShardFormatError(f"{idx_path}: tracklet {key} ends at byte {end}, past the end of "
                                       f"{row['shard']} ({shard_bytes} bytes); rerun prepare")
            tracklets.append(Tracklet(key=key, pid=int(row["pid"]), camid=int(row["camid"]),
                                      label=int(row["label"]) if split == "train" else -1, num_frames=n,
                                      shard=row["shard"], sample=sample, query=bool(row.get("query", False)),
                                      junk=bool(row.get("junk", False)),
                                      distractor=bool(row.get("distractor", False))))
            shard_of.append(sid)
            json_locs.append((members[0].offset, members[0].size))
            offsets.extend(m.offset for m in members[1:])
            sizes.extend(m.size for m in members[1:])
            exts.extend(frame_exts)
            starts.append(starts[-1] + n)
        if any(t.num_frames < 1 for t in tracklets):
            bad = next(t.key for t in tracklets if t.num_frames < 1)
            raise ShardFormatError(f"{manifest_path}: tracklet {bad} has no frames; rerun prepare")
        edited = ("; the manifest was edited (its content hash recomputed) or is wrong: rerun the prepare command "
                  "that wrote it (it restores the manifest)")
        for problem in label_problems(manifest["splits"]["train"]) if split == "train" else []:
            raise ShardFormatError(f"{manifest_path}: {problem}{edited}")

        num_ids = len({t.pid for t in tracklets if t.pid > 0})
        table = cls(directory, split, manifest["dataset"], tracklets, num_ids,
                    [str((directory / name).resolve()) for name in shard_ids], np.array(shard_of, dtype=np.int32),
                    np.array(starts, dtype=np.int64), np.array(offsets, dtype=np.int64),
                    np.array(sizes, dtype=np.int64), np.array(json_locs, dtype=np.int64).reshape(-1, 2),
                    [i[1] for i in indexes], [i[3] for i in indexes], np.array(exts, dtype=np.uint8), person_split)
        table.check_members(rows, f"{manifest_path}: {split} tracklet", edited)
        return table

    def check_members(self, rows: list[dict], where: str, advice: str) -> None:
        """Each manifest entry against its tracklet's JSON member in the shard (pid, camera, frame count, marks):
        one small `pread` per tracklet, what the manifest's unkeyed hash cannot vouch for."""
        store = self.store()
        try:
            for i, row in enumerate(rows):
                try:
                    meta = self.metadata(i, store)
                except (ValueError, UnicodeDecodeError):
                    raise ShardFormatError(f"{where} {row['key']}: its JSON member in {row['shard']} is not JSON"
                                           "; rerun prepare") from None
                differ = member_differences(row, meta if isinstance(meta, dict) else {})
                if differ:
                    raise ShardFormatError(f"{where} {row['key']}: the manifest says {', '.join(differ)}{advice}")
        finally:
            store.close()

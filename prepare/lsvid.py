"""Read an LS-VID tree into tracklets: train, val and test (query + gallery).

    ROOT/list_sequence/list_seq_{train,val,test}.txt   one tracklet per line: "<path prefix> <pid>"
    ROOT/test/data/info_test.mat                       MATLAB v7.3 (HDF5): `query` = 1-based rows of the test list
    ROOT/tracklet_train/, tracklet_val/, tracklet_test/  the frames

(TF-CLIP's copy keeps the lists and the .mat under ROOT/info/: info/list_sequence/..., info/data/info_test.mat;
both places are read.) LS-VID has no readme; this is what the public loaders of GLTR's successors (SINet,
BiCnet-TKS, TF-CLIP) read. A tracklet's frames are the files of the prefix's folder whose names start with the
prefix's last part; its camera is the third `_` field of a frame name (the same for all of them) and a frame's
number its last `_` field, by which the frames are ordered. pid -1 is junk (kept in the test and val galleries
as junk, left out of training, as SINet and TF-CLIP drop it); other pids must be positive. Where a real folder
differs from this, the reader stops with one line saying what it expected.
"""

from __future__ import annotations

import os
import re

from prepare.splitfiles import read_query_rows
from prepare.tracklet import PrepareError, Tracklet, list_files, numeric_name, stat_frames

LISTS = ("train", "val", "test")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
NUMBER = re.compile(r"^(\d+)\.[A-Za-z]+$", re.ASCII)


def _find(data_dir: str, *candidates: str) -> str:
    for relative in candidates:
        path = os.path.join(data_dir, relative)
        if os.path.isfile(path):
            return path
    raise PrepareError(f"{os.path.join(data_dir, candidates[0])}: not found (nor under info/); --data-dir must be the "
                       "LS-VID root holding list_sequence/ and test/data/info_test.mat")


def read_list(path: str) -> list[tuple[str, int]]:
    """(prefix, pid) per line of a list file; one line per tracklet."""
    rows = []
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not re.fullmatch(r"-?\d+", fields[1]):
            raise PrepareError(f"{path}:{lineno}: expected '<path prefix> <pid>', got {line.strip()!r}")
        prefix, pid = fields[0], int(fields[1])
        if os.path.isabs(prefix) or ".." in prefix.replace("\\", "/").split("/"):
            raise PrepareError(f"{path}:{lineno}: {prefix!r} must be a path relative to the LS-VID root")
        if pid == 0 or pid < -1:
            raise PrepareError(f"{path}:{lineno}: pid {pid}; expected identities >= 1 (or -1 for junk)")
        rows.append((prefix, pid))
    if not rows:
        raise PrepareError(f"{path}: holds no tracklets; restore the list file")
    return rows


class _Folders:
    """Frame files per folder, listed once (a folder holds many tracklets' frames)."""

    def __init__(self):
        self.cache: dict[str, list[str]] = {}

    def frames(self, folder: str) -> list[str]:
        if folder not in self.cache:
            if os.path.islink(folder) and not os.path.exists(folder):  # never an empty folder without a word
                raise PrepareError(f"{folder}: a symlink to a missing target ({os.readlink(folder)}): is a volume not "
                                   "mounted?")
            self.cache[folder] = list_files(folder, FRAME_SUFFIXES) if os.path.isdir(folder) else []
        return self.cache[folder]


def _tracklet_frames(root: str, prefix: str, folders: _Folders, where: str) -> tuple[list[str], int]:
    """(frame paths in frame-number order, camera) of the tracklet a list line names."""
    folder, start = os.path.split(os.path.join(root, prefix))
    names = [n for n in folders.frames(folder) if n.startswith(start)]
    if not names:
        raise PrepareError(f"{where}: {prefix!r} names no frames: expected files starting with {start!r} in {folder}")
    numbered = []
    for name in names:
        fields = name.split("_")
        number = NUMBER.match(fields[-1]) if len(fields) >= 4 else None
        if number is None or not numeric_name(fields[2]):
            raise PrepareError(f"{os.path.join(folder, name)}: expected an LS-VID frame name of 4 '_' fields with the "
                               "camera third and the frame number last (e.g. 0001_0012_03_0005.jpg)")
        numbered.append((int(number.group(1)), int(fields[2]), name))
    cameras = {cam for _, cam, _ in numbered}
    if len(cameras) != 1:
        raise PrepareError(f"{where}: the frames of {prefix!r} come from cameras {sorted(cameras)}; a tracklet has one")
    if len({n for n, _, _ in numbered}) != len(numbered):
        raise PrepareError(f"{where}: two frames of {prefix!r} carry the same frame number")
    return [os.path.join(folder, name) for _, _, name in sorted(numbered)], cameras.pop()


def scan_lsvid(data_dir: str, skip_bad: bool = False) -> tuple[list[Tracklet], list[dict], list[str]]:
    """(tracklets of train, val and test, skipped, note lines)."""
    if not os.path.isdir(data_dir):
        raise PrepareError(f"{data_dir}: LS-VID folder not found; pass the LS-VID root with --data-dir")
    lists = {name: _find(data_dir, f"list_sequence/list_seq_{name}.txt", f"info/list_sequence/list_seq_{name}.txt")
             for name in LISTS}
    rows = {name: read_list(path) for name, path in lists.items()}
    info = _find(data_dir, "test/data/info_test.mat", "info/data/info_test.mat")
    queries = set(read_query_rows(info, len(rows["test"])))
    junk_queries = [r for r in sorted(queries) if rows["test"][r - 1][1] == -1]
    if junk_queries:
        raise PrepareError(f"{info}: query row {junk_queries[0]} is a junk tracklet (pid -1) of list_seq_test.txt; "
                           "a query needs an identity")

    folders, tracklets, skipped, notes = _Folders(), [], [], []
    for name, path in lists.items():
        for row, (prefix, pid) in enumerate(rows[name], start=1):
            key = f"{name}{row:05d}"  # test00042: the 42nd line of list_seq_test.txt
            if name == "train" and pid == -1:
                continue  # junk cannot be a class (SINet and TF-CLIP drop it as well)
            where = f"{path}:{row}"
            try:
                frames, cam = _tracklet_frames(data_dir, prefix, folders, where)
                stats = stat_frames(frames)
                if isinstance(stats, str):
                    raise PrepareError(stats)
            except PrepareError as e:
                if not skip_bad:
                    raise PrepareError(f"{e}" + ("" if "--skip-bad" in str(e) else
                                                  "; fix the data or pass --skip-bad to skip this tracklet")) from None
                skipped.append({"key": key, "group": name, "reason": str(e)})
                continue
            if name == "train":
                splits, flags = ("train",), {}
            elif name == "val":  # every val tracklet queries the others (see stenvan.person_splits)
                splits, flags = ("val",), {"query": pid > 0, "junk": pid == -1}
            else:
                is_query = row in queries
                splits = ("query", "gallery") if is_query else ("gallery",)
                flags = {"query": is_query, "junk": pid == -1}
            tracklets.append(Tracklet(key=key, group=name, pid=pid, camid=cam, frames=frames, sizes=stats[0],
                                      mtimes=stats[1], splits=splits, flags=flags))
    left_out = sum(pid == -1 for _, pid in rows["train"])
    if left_out:
        notes.append(f"note: {left_out} junk tracklets (pid -1) of list_seq_train.txt are not trained on")
    return tracklets, skipped, notes

"""Read a DukeMTMC-VideoReID tree (train/, query/, gallery/, each <PPPP>/<TTTT>/frames) into tracklets.

Frames are `PPPP_Cc_Fffff_Xnnnnnn.jpg`: identity, camera, frame index inside the tracklet, original video
frame number. The archive as distributed has two quirks, both accepted (torchreid's reader handles them too):
some tracklets start at F0002 (or later) instead of F0001, and some frames use an older naming without
underscores, `0001C6F0099X30823.jpg`. Frames are ordered by their index, which must run without gaps or
repeats from the tracklet's first frame. The gallery already holds every query tracklet (design §2, §5).
"""

from __future__ import annotations

import os
import re

from prepare.tracklet import PrepareError, Tracklet, list_entries, numeric_name, stat_frames

# PPPP_Cc_Fffff_Xn.jpg or the older PPPPCcFffffXn.jpg (group 2 is the separator, the same throughout a name).
NAME = re.compile(r"^(\d{4})(_?)C(\d)\2F(\d{4})\2X(\d+)\.jpg$", re.ASCII)  # ASCII digits only
SPLITS = ("train", "query", "gallery")


def _numeric_dirs(path: str, what: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(the numbered folders in `path`, (name, problem) of each entry that cannot be examined: a symlink to a
    missing target is a folder that vanished, reported rather than dropped). Plain files are not folders."""
    entries = list_entries(path)
    for e in entries:
        if e.kind == "folder" and not numeric_name(e.name):
            raise PrepareError(f"{e.path}: {what} folders must be numbers (ASCII digits); move this folder out of "
                               "the dataset")
    return [e.name for e in entries if e.kind == "folder"], [(e.name, e.problem) for e in entries if e.kind == "broken"]


def _tracklet(folder: str, pid: str, number: str, split: str) -> tuple[Tracklet | None, str | None]:
    entries = [e for e in list_entries(folder) if e.name.lower().endswith((".jpg", ".jpeg"))]
    bad = next((e for e in entries if e.kind != "file"), None)
    if bad is not None:  # a frame name that is a folder, a FIFO, a device or a dangling symlink
        return None, bad.problem or f"{bad.path}: is a folder, not a frame file"
    files = [e.name for e in entries]
    if not files:
        return None, f"{folder}: tracklet folder holds no JPEG frames"
    parsed = [NAME.match(f) for f in files]
    if not all(parsed):
        bad = files[[m is None for m in parsed].index(True)]
        return None, (f"{os.path.join(folder, bad)}: not a DukeV frame name (PPPP_Cc_Fffff_Xn.jpg or the older "
                      "PPPPCcFffffXn.jpg)")
    if {m.group(1) for m in parsed} != {pid}:
        return None, f"{folder}: frames name identities {sorted({m.group(1) for m in parsed})}, the folder says {pid}"
    cameras = {m.group(3) for m in parsed}
    if len(cameras) != 1:
        return None, f"{folder}: frames come from cameras {sorted(cameras)}; a tracklet has one camera"
    indices = sorted(int(m.group(4)) for m in parsed)
    first, last = indices[0], indices[-1]
    if indices != list(range(first, first + len(indices))):
        missing = sorted(set(range(first, last + 1)) - set(indices))
        repeated = sorted({i for i, j in zip(indices, indices[1:]) if i == j})
        return None, (f"{folder}: frame indices F{first:04d}..F{last:04d} have gaps or repeats (missing "
                      f"{['F%04d' % i for i in missing[:5]]}, repeated {['F%04d' % i for i in repeated[:5]]}); "
                      "restore the frames")
    by_index = {int(m.group(4)): os.path.join(folder, m.group(0)) for m in parsed}
    paths = [by_index[i] for i in indices]
    stats = stat_frames(paths)
    if isinstance(stats, str):
        return None, stats
    camid = int(cameras.pop())
    key = f"{pid}_C{camid}_T{number}"
    return Tracklet(key=key, group=split, pid=int(pid), camid=camid, frames=paths, sizes=stats[0], mtimes=stats[1],
                    splits=(split,)), None


def _skip_or_stop(skipped: list, skip_bad: bool, key: str, split: str, problem: str, what: str) -> None:
    """Stop with `problem`, or (--skip-bad) list the skip in the manifest with its reason."""
    if not skip_bad:
        raise PrepareError(problem + ("" if "--skip-bad" in problem else
                                      f"; fix the data or pass --skip-bad to skip {what}"))
    skipped.append({"key": key, "group": split, "reason": problem})


def scan_dukev(data_dir: str, skip_bad: bool = False) -> tuple[list[Tracklet], list[dict]]:
    """All DukeV tracklets (train, query, gallery) and the list of skipped tracklets."""
    if not os.path.isdir(data_dir):
        raise PrepareError(f"{data_dir}: DukeV folder not found; pass the folder holding train/, query/ and "
                           "gallery/ with --data-dir")
    tracklets, skipped = [], []
    for split in SPLITS:
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise PrepareError(f"{root}: {split}/ folder not found; --data-dir must hold train/, query/ and gallery/")
        pids, broken = _numeric_dirs(root, "identity")
        for name, problem in broken:  # an identity folder that vanished: all its tracklets
            _skip_or_stop(skipped, skip_bad, name, split, problem, "this identity")
        for pid in pids:
            numbers, broken = _numeric_dirs(os.path.join(root, pid), "tracklet")
            for name, problem in broken:
                _skip_or_stop(skipped, skip_bad, f"{pid}_T{name}", split, problem, "this tracklet")
            for number in numbers:
                tracklet, problem = _tracklet(os.path.join(root, pid, number), pid, number, split)
                if problem is not None:
                    _skip_or_stop(skipped, skip_bad, f"{pid}_T{number}", split, problem, "this tracklet")
                    continue
                tracklets.append(tracklet)
    query_keys = {t.key for t in tracklets if t.group == "query"}
    query_pids = {t.pid for t in tracklets if t.group == "query"}
    for t in tracklets:
        if t.group == "gallery":
            # Gallery-only identities are distractors; a gallery tracklet may be the copy of a query tracklet.
            t.flags = {"query": t.key in query_keys, "distractor": t.pid not in query_pids}
    return tracklets, skipped

"""Read an iLIDS-VID tree into tracklets and its 10 person splits.

    ROOT/i-LIDS-VID/sequences/cam1/personNNN/cam1_personNNN_FFFFF.png   (and cam2/...)
    ROOT/train-test people splits/train_test_splits_ilidsvid.mat        (ls_set, 10 x 300)
    ROOT/splits.json                                                    (optional: torchreid's, checked)

ROOT is the extracted archive, or torchreid's `ilids-vid/` folder (the same two folders plus its splits.json).
Every person has one sequence per camera; frames are ordered by their frame number (the last field), which
starts anywhere. Split i follows torchreid: `ls_set[i, :150]` (1-based positions in the name-sorted person
folders) are the test persons, the rest train; so our split i is torchreid's `split_id = i`. All 600 sequences
are sharded once (shard group "all"); the manifest's `person_splits` says which persons each split uses.
"""

from __future__ import annotations

import json
import os
import re

from prepare.splitfiles import ls_set_splits, read_ls_set
from prepare.tracklet import PrepareError, Tracklet, numbered_frames, person_folders, stat_frames

PERSON = re.compile(r"^person(\d{3})$", re.ASCII)
CAMERAS = (1, 2)
SPLIT_FILE = os.path.join("train-test people splits", "train_test_splits_ilidsvid.mat")


def _persons(cam_dir: str) -> list[str]:
    return person_folders(cam_dir, PERSON, "camera folder not found; --data-dir must hold i-LIDS-VID/sequences/cam1 and "
                          "cam2 (the extracted iLIDS-VID archive, or torchreid's ilids-vid/ folder)",
                          "iLIDS-VID person (personNNN)")


def scan_ilidsvid(data_dir: str, skip_bad: bool = False) -> tuple[list[Tracklet], list[dict], dict, list[str]]:
    """(tracklets, skipped, the manifest's person-split fields, warning lines)."""
    sequences = os.path.join(data_dir, "i-LIDS-VID", "sequences")
    if not os.path.isdir(sequences):
        raise PrepareError(f"{sequences}: not found; --data-dir must be the extracted iLIDS-VID archive (holding "
                           "i-LIDS-VID/sequences/ and 'train-test people splits/') or torchreid's ilids-vid/ folder")
    split_path = os.path.join(data_dir, SPLIT_FILE)
    if not os.path.isfile(split_path):
        raise PrepareError(f"{split_path}: split file not found; it comes with the iLIDS-VID archive (ls_set, the 10 "
                           "published splits)")
    persons = {cam: _persons(os.path.join(sequences, f"cam{cam}")) for cam in CAMERAS}
    for cam, other in ((1, 2), (2, 1)):
        alone = sorted(set(persons[cam]) - set(persons[other]))
        if alone:
            raise PrepareError(f"{os.path.join(sequences, f'cam{cam}', alone[0])}: this person has no sequence in "
                               f"cam{other} ({len(alone)} such); every iLIDS-VID person is seen by both cameras: "
                               "restore the missing folder")
    names = persons[1]  # name-sorted: the order ls_set's positions count in
    splits = ls_set_splits(read_ls_set(split_path, len(names)), names)
    warnings = _check_torchreid_splits(os.path.join(data_dir, "splits.json"), splits)

    tracklets, skipped = [], []
    for person in names:
        for cam in CAMERAS:
            folder = os.path.join(sequences, f"cam{cam}", person)
            frame_name = re.compile(rf"^cam{cam}_{person}_(\d+)\.png$", re.ASCII)
            paths, problem = numbered_frames(folder, frame_name, f"expected cam{cam}_{person}_FFFFF.png")
            stats = stat_frames(paths) if problem is None else problem
            if isinstance(stats, str):
                if not skip_bad:
                    raise PrepareError(stats + ("" if "--skip-bad" in stats else
                                                "; fix the data or pass --skip-bad to skip this sequence"))
                skipped.append({"key": f"{person}_C{cam}", "group": "all", "reason": stats})
                continue
            tracklets.append(Tracklet(key=f"{person}_C{cam}", group="all", pid=int(person[-3:]), camid=cam,
                                      frames=paths, sizes=stats[0], mtimes=stats[1],
                                      splits=("train", "query" if cam == 1 else "gallery")))
    extra = {"person_splits": [{part: sorted(int(p[-3:]) for p in s[part]) for part in ("train", "test")}
                               for s in splits],
             "person_splits_source": f"{SPLIT_FILE}: ls_set[i, :{len(names) // 2}] test, the rest train (1-based "
                                     "positions in the name-sorted person folders; split i = torchreid split_id i)"}
    return tracklets, skipped, extra, warnings


def _check_torchreid_splits(path: str, splits: list[dict]) -> list[str]:
    """torchreid's splits.json beside the archive (if any) should say what ls_set says; a line if it does not."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            theirs = json.load(f)
        same = [{k: sorted(s[k]) for k in ("train", "test")} for s in theirs] == splits
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        same = False
    if same:
        return []
    return [f"warning: {path} does not match ls_set read with torchreid's convention (name-sorted person folders); "
            "it is ignored: the splits come from the .mat (a splits.json written by a loader that lists the folders "
            "unsorted, e.g. SINet's, numbers the splits differently)"]

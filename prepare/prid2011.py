"""Read a PRID-2011 tree into tracklets and its 10 person splits.

    ROOT/prid_2011/multi_shot/cam_a/person_NNNN/NNNN.png   (385 persons)
    ROOT/prid_2011/multi_shot/cam_b/person_NNNN/NNNN.png   (749 persons)
    ROOT/splits_prid2011.json                              (torchreid's; or --splits FILE)

Persons 1-200 are seen by both cameras; higher numbers are different people in the two cameras (single-view
distractors that the video protocol does not use). The published protocol uses the 178 of the first 200 whose
sequences have at least 27 frames in both cameras, in 10 splits of 89 train / 89 test persons, published as
torchreid's `splits_prid2011.json`. With that file (beside `prid_2011/`, as torchreid keeps it, or `--splits`)
its persons and splits are used as given; without it, the persons are chosen by that rule and split into 10
seeded halves, with a warning that they are not the published splits. Only the split persons' sequences (both
cameras) are sharded, in frame-number order.
"""

from __future__ import annotations

import os
import re

from prepare.splitfiles import read_split_json, seeded_splits
from prepare.tracklet import PrepareError, Tracklet, numbered_frames, person_folders, stat_frames

PERSON = re.compile(r"^person_(\d{4})$", re.ASCII)
FRAME = re.compile(r"^(\d+)\.png$", re.ASCII)
CAMERAS = {1: "cam_a", 2: "cam_b"}
BOTH_VIEWS = 200  # persons 1..200 appear in both cameras
MIN_FRAMES = 27  # the protocol's rule: at least this many frames in both cameras (178 persons)
SPLITS_NAME = "splits_prid2011.json"


def _folders(cam_dir: str) -> list[str]:
    return person_folders(cam_dir, PERSON, "camera folder not found; --data-dir must hold prid_2011/multi_shot/cam_a "
                          "and cam_b (torchreid's prid2011/ folder)", "PRID-2011 person (person_NNNN)")


def scan_prid2011(data_dir: str, splits_file: str | None = None,
                  skip_bad: bool = False) -> tuple[list[Tracklet], list[dict], dict, list[str]]:
    """(tracklets, skipped, the manifest's person-split fields, warning lines)."""
    shots = os.path.join(data_dir, "prid_2011", "multi_shot")
    if not os.path.isdir(shots):
        raise PrepareError(f"{shots}: not found; --data-dir must hold prid_2011/multi_shot/ (torchreid's prid2011/ "
                           "folder, with splits_prid2011.json beside prid_2011/)")
    cams = {cam: os.path.join(shots, name) for cam, name in CAMERAS.items()}
    folders = {cam: _folders(path) for cam, path in cams.items()}
    both = sorted(p for p in set(folders[1]) & set(folders[2]) if int(p[-4:]) <= BOTH_VIEWS)
    sequences = {(p, cam): numbered_frames(os.path.join(cams[cam], p), FRAME, "expected NNNN.png")
                 for p in both for cam in CAMERAS}
    broken = next((problem for _, problem in sequences.values() if problem), None)
    if broken and not skip_bad:  # an empty or foreign folder is bad input whichever persons the splits take
        raise PrepareError(broken + "; fix the data or pass --skip-bad to leave this sequence out")

    warnings = []
    path = splits_file or os.path.join(data_dir, SPLITS_NAME)
    if splits_file or os.path.isfile(path):
        splits = read_split_json(path)
        persons = sorted({p for s in splits for part in ("train", "test") for p in s[part]})
        for p in persons:
            if p not in both:
                raise PrepareError(f"{path}: names {p}, which is not a person seen by both cameras (person_0001.."
                                   f"person_{BOTH_VIEWS:04d} with a folder in cam_a and cam_b); the split file does "
                                   "not belong to this tree")
        source = f"{os.path.basename(path)} (torchreid's split file)"
    else:
        persons = [p for p in both if all(sequences[(p, cam)][0] is not None
                                          and len(sequences[(p, cam)][0]) >= MIN_FRAMES for cam in CAMERAS)]
        if len(persons) < 2:
            raise PrepareError(f"{shots}: {len(persons)} persons have >= {MIN_FRAMES} frames in both cameras; the "
                               "protocol needs at least 2")
        splits = seeded_splits(persons)
        source = (f"seeded (seed 0): {len(persons) - len(persons) // 2}/{len(persons) // 2} train/test halves of the "
                  f"{len(persons)} persons with >= {MIN_FRAMES} frames in both cameras; not the published splits")
        warnings.append(f"warning: no {SPLITS_NAME} beside prid_2011/ (nor --splits): using 10 seeded splits of the "
                        f"{len(persons)} persons with >= {MIN_FRAMES} frames in both cameras; they are NOT the "
                        "published splits, so results do not compare with papers (get torchreid's file for that)")

    tracklets, skipped = [], []
    for p in persons:
        for cam in CAMERAS:
            paths, problem = sequences[(p, cam)]
            stats = stat_frames(paths) if problem is None else problem
            key = f"{p}_{CAMERAS[cam][-1].upper()}"  # person_0001_A
            if isinstance(stats, str):
                if not skip_bad:
                    raise PrepareError(stats + ("" if "--skip-bad" in stats else
                                                "; fix the data or pass --skip-bad to skip this sequence"))
                skipped.append({"key": key, "group": "all", "reason": stats})
                continue
            tracklets.append(Tracklet(key=key, group="all", pid=int(p[-4:]), camid=cam, frames=paths, sizes=stats[0],
                                      mtimes=stats[1], splits=("train", "query" if cam == 1 else "gallery")))
    extra = {"person_splits": [{part: sorted(int(p[-4:]) for p in s[part]) for part in ("train", "test")}
                               for s in splits], "person_splits_source": source}
    return tracklets, skipped, extra, warnings

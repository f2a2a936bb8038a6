"""Hand-built iLIDS-VID, PRID-2011 and LS-VID trees with known answers (split membership, cameras, frame order),
for the reader tests. Frames are tiny PNG/JPEG files whose pixels encode (person, camera, frame number), so a test
can tell from a decoded frame which file it came from."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from prepare.matfile import mat_bytes
from prepare.synthetic_layouts import write_info_test

FRAME_HW = (16, 8)


def frame_pixels(person: int, cam: int, number: int, hw: tuple[int, int] = FRAME_HW) -> np.ndarray:
    """A (h, w, 3) uint8 frame that says who, where and when: pixel (0, 0) holds person, camera and frame number."""
    rng = np.random.default_rng([person, cam, number])
    pixels = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    pixels[0, 0] = (person % 256, cam, number % 256)
    return pixels


def write_frames(folder: Path, names_numbers: list[tuple[str, int]], person: int, cam: int, fmt: str = "PNG",
                 hw: tuple[int, int] = FRAME_HW):
    """Write the frames in shuffled order (directory order then differs from name order)."""
    folder.mkdir(parents=True, exist_ok=True)
    shuffled = list(names_numbers)
    random.Random(person * 10 + cam).shuffle(shuffled)
    for name, number in shuffled:
        options = {"quality": 95} if fmt == "JPEG" else {}
        Image.fromarray(frame_pixels(person, cam, number, hw)).save(folder / name, fmt, **options)


ILIDS_PERSONS = [2, 5, 9, 13]  # numbers with gaps
ILIDS_LENGTHS = {(2, 1): 5, (2, 2): 3, (5, 1): 4, (5, 2): 6, (9, 1): 3, (9, 2): 4, (13, 1): 7, (13, 2): 3}
# ls_set rows: 1-based positions in the name-sorted person list (person002, person005, person009, person013);
# torchreid: the first half of a row is the test persons.
ILIDS_LS_SET = np.array([[4, 1, 2, 3], [2, 3, 1, 4]] * 5, dtype=np.int32)


def ilidsvid_tree(root: Path, ls_set: np.ndarray = ILIDS_LS_SET) -> Path:
    for person in ILIDS_PERSONS:
        for cam in (1, 2):
            start = 300 + 17 * person + cam  # frame numbers start anywhere
            name = f"person{person:03d}"
            frames = [(f"cam{cam}_{name}_{start + i:05d}.png", start + i) for i in range(ILIDS_LENGTHS[(person, cam)])]
            write_frames(root / "i-LIDS-VID" / "sequences" / f"cam{cam}" / name, frames, person, cam)
    splits = root / "train-test people splits"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "train_test_splits_ilidsvid.mat").write_bytes(mat_bytes("ls_set", ls_set))
    return root


def prid_tree(root: Path, lengths: dict[tuple[int, int], int], splits: list[dict] | None = None,
              hw: tuple[int, int] = FRAME_HW) -> Path:
    """lengths[(person, cam)] frames; cam 1 = cam_a, 2 = cam_b."""
    for (person, cam), n in lengths.items():
        frames = [(f"{i:04d}.png", i) for i in range(1, n + 1)]
        write_frames(root / "prid_2011" / "multi_shot" / f"cam_{'ab'[cam - 1]}" / f"person_{person:04d}", frames,
                     person, cam, hw=hw)
    if splits is not None:
        (root / "splits_prid2011.json").write_text(json.dumps(splits, indent=4))
    return root


# LS-VID: (list, prefix, pid, camera, frame numbers). Frame numbers deliberately unpadded: 9 comes before 10.
LSVID_ROWS = {
    "train": [("tracklet_train/0001/0001_0001_03_", 1, 3, [1, 2, 3]),
              ("tracklet_train/0001/0001_0002_05_", 1, 5, [7, 8]),
              ("tracklet_train/0004/0004_0001_02_", 4, 2, [1, 2]),
              ("tracklet_train/0004/0004_0002_06_", 4, 6, [4, 5, 6])],
    "val": [("tracklet_val/0006/0006_0001_01_", 6, 1, [1, 2]), ("tracklet_val/0006/0006_0002_02_", 6, 2, [3, 4]),
            ("tracklet_val/0007/0007_0001_01_", 7, 1, [1, 2, 3]), ("tracklet_val/0007/0007_0002_03_", 7, 3, [2, 3])],
    "test": [("tracklet_test/0010/0010_0001_04_", 10, 4, [8, 9, 10, 11]),
             ("tracklet_test/0010/0010_0002_07_", 10, 7, [1, 2]),
             ("tracklet_test/0010/0010_0003_04_", 10, 4, [3, 4]),
             ("tracklet_test/0012/0012_0001_11_", 12, 11, [5, 6, 7]),
             ("tracklet_test/0012/0012_0002_02_", 12, 2, [1, 2]),
             ("tracklet_test/junk/0000_0001_09_", -1, 9, [1, 2])],
}
LSVID_QUERIES = [1, 4]  # 1-based rows of list_seq_test.txt


def lsvid_tree(root: Path, rows: dict = LSVID_ROWS, queries: list[int] = LSVID_QUERIES) -> Path:
    lists = root / "list_sequence"
    lists.mkdir(parents=True, exist_ok=True)
    for name, entries in rows.items():
        for prefix, pid, cam, numbers in entries:
            folder, start = os.path.split(prefix)
            write_frames(root / folder, [(f"{start}{n}.jpg", n) for n in numbers], max(pid, 0) + 100 * cam, cam,
                         "JPEG")
        (lists / f"list_seq_{name}.txt").write_text("".join(f"{p} {pid}\n" for p, pid, _, _ in entries))
    write_info_test(root / "test" / "data" / "info_test.mat", queries)
    return root

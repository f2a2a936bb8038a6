"""Synthetic iLIDS-VID, PRID-2011 and LS-VID: the plans (every tracklet, its folder and frame names) and the
split / query files that the real archives ship (facts: docs/pending/issue-15.md, "preparing").

- iLIDS-VID: `i-LIDS-VID/sequences/cam{1,2}/personNNN/camC_personNNN_FFFFF.png` (person numbers with gaps,
  frame numbers starting anywhere) and `train-test people splits/train_test_splits_ilidsvid.mat` (`ls_set`).
- PRID-2011: `prid_2011/multi_shot/cam_{a,b}/person_NNNN/NNNN.png` (persons 1..n in both cameras, more in
  each camera alone, who are different people) and torchreid's `splits_prid2011.json` over the persons with at
  least 27 frames in both cameras.
- LS-VID: `tracklet_{train,val,test}/PPPP/PPPP_TTTT_CC_FFFF.jpg`, `list_sequence/list_seq_*.txt` and the HDF5
  `test/data/info_test.mat`.
Small datasets with `num_ids`; `real=True` gives the real counts (LS-VID's are large: ~3M frames).
Every random choice comes from `rng_for(seed, what, ...)`, so the bytes never depend on the worker count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prepare.matfile import mat_bytes
from prepare.prid2011 import MIN_FRAMES
from prepare.synthetic_plan import Plan, TrackPlan, rng_for
from prepare.synthetic_sizes import lengths_with_total, spread

LAYOUTS = ("ilidsvid", "prid2011", "lsvid")
PNG_SIZE = (128, 64)  # iLIDS-VID and PRID-2011 crops, h x w
LSVID_CAMERAS = 15
# Real sizes. iLIDS-VID: 300 persons numbered up to 319, 600 sequences of 23..192 frames (mean 73: Wang et al. ECCV
# 2014; unverified). PRID-2011: 385 persons in cam_a, 749 in cam_b, 1..200 in both, 178 of those with >= 27 frames in
# both cameras; 5..675 frames (paper; unverified). LS-VID: 3,772 ids, 14,943 tracklets, ~200 frames each (GLTR);
# our split of them (train 842 ids / 2,831 tracklets, val 200 / 779, test 2,730 / 11,333 with 3,504 queries) follows
# SINet's docstring for train / query / gallery and is otherwise ours (unverified).
ILIDS_REAL = {"persons": 300, "max_person": 319, "min_len": 23, "max_len": 192, "mean_len": 73}
PRID_REAL = {"both": 200, "cam_a": 385, "cam_b": 749, "kept": 178, "min_len": 5, "max_len": 675, "mean_len": 100}
LSVID_REAL = {"ids": (842, 200, 2730), "tracklets": (2831, 779, 11333), "queries": 3504, "mean_len": 200,
              "min_len": 2, "max_len": 1000}


def _lengths(rng, n: int, lo: int, hi: int, mean: float | None) -> list[int]:
    """n lengths in lo..hi: log-uniform for small datasets, log-normal with a fixed total (the real mean) for real
    sizes; one of each extreme when n >= 2."""
    if mean is not None and n >= 2:
        total = int(np.clip(round(n * mean), (n - 1) * lo + hi, lo + (n - 1) * hi))
        return [int(v) for v in rng.permutation(lengths_with_total(rng, n, total, lo, hi))]
    out = [int(round(np.exp(rng.uniform(np.log(lo), np.log(hi + 0.5))))) for _ in range(n)]
    out = [min(max(v, lo), hi) for v in out]
    if n >= 2:
        out[0], out[-1] = lo, hi
    return out


def _finish(layout: str, tracks: list[TrackPlan], meta: dict) -> Plan:
    for ordinal, t in enumerate(tracks):
        t.ordinal = ordinal
    return Plan(layout, tracks, [], [], meta)


def plan_ilidsvid(num_ids: int, seed: int, min_len: int, max_len: int, real: bool = False) -> Plan:
    rng = rng_for(seed, 20)
    n = ILIDS_REAL["persons"] if real else num_ids
    top = ILIDS_REAL["max_person"] if real else min(999, max(n, round(n * 319 / 300)))
    numbers = sorted(int(p) for p in rng.choice(np.arange(1, top + 1), size=n, replace=False))  # with gaps
    lengths = _lengths(rng, 2 * n, min_len, max_len, ILIDS_REAL["mean_len"] if real else None)
    tracks = []
    for k, pid in enumerate(numbers):
        for cam in (1, 2):
            t = TrackPlan(pid=pid, person=pid, camid=cam, number=1, length=lengths[2 * k + cam - 1], size=PNG_SIZE)
            t.folders = [f"i-LIDS-VID/sequences/cam{cam}/person{pid:03d}"]
            t.first_frame = int(rng.integers(1, 1000))  # a sequence's frame numbers start anywhere
            tracks.append(t)
    ls_set = np.stack([rng.permutation(n) + 1 for _ in range(10)]).astype(np.int32)  # positions, 1-based
    return _finish("ilidsvid", tracks, {"ls_set": ls_set})


def plan_prid2011(num_ids: int, seed: int, min_len: int, max_len: int, real: bool = False) -> Plan:
    if max_len < MIN_FRAMES:
        raise ValueError(f"--max-len {max_len}: PRID-2011's protocol keeps persons with >= {MIN_FRAMES} frames in both "
                         f"cameras, so --max-len must be at least {MIN_FRAMES}")
    rng = rng_for(seed, 21)
    both = PRID_REAL["both"] if real else num_ids
    if both > 200:
        raise ValueError("--ids: PRID-2011 has at most 200 persons seen by both cameras")
    only_a = PRID_REAL["cam_a"] - 200 if real else round(both * 185 / 200)
    only_b = PRID_REAL["cam_b"] - 200 if real else round(both * 549 / 200)
    dropped = both - PRID_REAL["kept"] if real else max(1, round(both * 22 / 200))
    if min_len >= MIN_FRAMES:  # no sequence can be too short for the rule
        dropped = 0
    short = set(rng.choice(both, size=dropped, replace=False).tolist())  # a camera below MIN_FRAMES
    mean = PRID_REAL["mean_len"] if real else None
    long_lengths = _lengths(rng, 2 * both, max(min_len, MIN_FRAMES), max_len, mean)
    tracks = []
    for k in range(both):
        short_cam = 1 + int(rng.integers(2)) if k in short else 0
        for cam in (1, 2):
            length = int(rng.integers(min_len, MIN_FRAMES)) if cam == short_cam else long_lengths[2 * k + cam - 1]
            tracks.append(_prid_track(k + 1, k + 1, cam, length))
    # Persons seen by one camera only: numbered from 201 in the real set (different people in each camera).
    first = 201 if real else both + 1
    for cam, count in ((1, only_a), (2, only_b)):
        for k, length in enumerate(_lengths(rng, count, min_len, max_len, mean)):
            tracks.append(_prid_track(first + k, 100000 * cam + first + k, cam, length))
    kept = [f"person_{k + 1:04d}" for k in range(both) if k not in short]
    half = len(kept) // 2
    splits = []
    for _ in range(10):
        order = rng.permutation(len(kept))
        splits.append({"test": sorted(kept[i] for i in order[:half]), "train": sorted(kept[i] for i in order[half:])})
    return _finish("prid2011", tracks, {"splits": splits})


def _prid_track(pid: int, person: int, cam: int, length: int) -> TrackPlan:
    t = TrackPlan(pid=pid, person=person, camid=cam, number=1, length=length, size=PNG_SIZE)
    t.folders = [f"prid_2011/multi_shot/cam_{'ab'[cam - 1]}/person_{pid:04d}"]
    return t


def plan_lsvid(num_ids: int, seed: int, min_len: int, max_len: int, real: bool = False) -> Plan:
    rng = rng_for(seed, 22)
    if real:
        ids, counts, num_queries = LSVID_REAL["ids"], LSVID_REAL["tracklets"], LSVID_REAL["queries"]
    else:
        val = max(2, num_ids // 10)
        train = max(2, num_ids // 3)
        ids = (train, val, max(2, num_ids - train - val))
        counts = tuple(3 * n for n in ids)
        num_queries = ids[2]
    pids = rng.permutation(np.arange(1, sum(ids) + 1)).tolist()
    mean = LSVID_REAL["mean_len"] if real else None
    lists, tracks, start = {}, [], 0
    for name, n, count in zip(("train", "val", "test"), ids, counts):
        group = sorted(pids[start:start + n])
        start += n
        junk = 0 if real or name == "train" else max(1, n // 8)  # pid -1 lines (unverified in the real lists)
        per_id = spread(rng, count - junk, n, 2, 2 * LSVID_CAMERAS)  # at least 2 tracklets: 2+ cameras
        rows = []
        for pid, k in zip(group, per_id.tolist()):
            cams = rng.choice(np.arange(1, LSVID_CAMERAS + 1), size=min(k, LSVID_CAMERAS), replace=False)
            rows += [(pid, int(cams[j % len(cams)])) for j in range(k)]
        rows += [(-1, int(rng.integers(1, LSVID_CAMERAS + 1))) for _ in range(junk)]
        lengths = _lengths(rng, len(rows), min_len, max_len, mean)
        numbers: dict[int, int] = {}
        entries = []
        for (pid, cam), length in zip(rows, lengths):
            numbers[pid] = numbers.get(pid, 0) + 1
            folder = f"tracklet_{name}/{'junk' if pid == -1 else f'{pid:04d}'}"
            prefix = f"{max(pid, 0):04d}_{numbers[pid]:04d}_{cam:02d}_"
            t = TrackPlan(pid=pid, person=pid if pid > 0 else 200000 + len(tracks), camid=cam, number=numbers[pid],
                          length=length)
            t.folders, t.prefix, t.first_frame = [folder], prefix, 1
            tracks.append(t)
            entries.append((f"{folder}/{prefix}", pid))
        lists[name] = entries
    test = lists["test"]
    real_rows = [r for r, (_, pid) in enumerate(test, start=1) if pid > 0]
    first_of_id = {}
    for r in real_rows:
        first_of_id.setdefault(test[r - 1][1], r)
    queries = set(first_of_id.values())  # every test id has a query ...
    extra = [r for r in rng.permutation(real_rows).tolist() if r not in queries]
    queries |= set(extra[:max(0, num_queries - len(queries))])  # ... and some have more
    return _finish("lsvid", tracks, {"lists": lists, "queries": sorted(queries)})


def frame_name(t: TrackPlan, layout: str, i: int) -> str:
    if layout == "ilidsvid":
        return f"cam{t.camid}_person{t.pid:03d}_{t.first_frame + i:05d}.png"
    if layout == "prid2011":
        return f"{i + 1:04d}.png"
    return f"{t.prefix}{t.first_frame + i:04d}.jpg"


def write_meta(root: Path, plan: Plan) -> None:
    """The split and query files of the layout (as the real archives ship them)."""
    if plan.layout == "ilidsvid":
        folder = root / "train-test people splits"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train_test_splits_ilidsvid.mat").write_bytes(mat_bytes("ls_set", plan.meta["ls_set"]))
    elif plan.layout == "prid2011":  # torchreid writes its JSON with 4-space indentation
        (root / "splits_prid2011.json").write_text(json.dumps(plan.meta["splits"], indent=4, sort_keys=True) + "\n")
    else:
        folder = root / "list_sequence"
        folder.mkdir(parents=True, exist_ok=True)
        for name, entries in plan.meta["lists"].items():
            (folder / f"list_seq_{name}.txt").write_text("".join(f"{prefix} {pid}\n" for prefix, pid in entries))
        write_info_test(root / "test" / "data" / "info_test.mat", plan.meta["queries"])


def write_info_test(path: Path, queries: list[int]) -> None:
    """A MATLAB v7.3 file as the real one is read: HDF5 with a 512-byte MATLAB header, `query` a 1 x Q double row
    (MATLAB's Q x 1 column, transposed by HDF5). Byte-identical for the same rows (no time stamps)."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        dataset = f.create_dataset("query", data=np.asarray(queries, dtype=np.float64).reshape(1, -1),
                                   track_times=False)
        dataset.attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 1970 HDF5 schema 1.00 ."
                .ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM")

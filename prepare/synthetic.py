"""Synthetic datasets written in the exact on-disk layouts of MARS and DukeMTMC-VideoReID (design §2).

`python -m prepare synthetic --layout {mars,dukev} --out DIR --ids N --seed S [--min-len A --max-len B]`

The tree is what `prepare mars` / `prepare dukev` read for the real datasets, so tests and the demo exercise
the real code paths. Every random choice comes from a generator seeded by (seed, what, which), so the same
arguments give the same bytes. Among the tracklets there is always one of exactly `min_len` frames and one
of exactly `max_len` frames, so the extremes are always exercised.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prepare.matfile import mat_bytes
from prepare.render import TrackletRenderer, encode_jpeg, random_camera, random_identity

MARS_CAMERAS, DUKEV_CAMERAS = 6, 8


@dataclass
class TrackPlan:
    """One tracklet to render: who, where, how long; `name_of(i)` gives frame i's file name."""
    pid: int  # identity in the file names (0 = distractor, -1 = junk on MARS)
    person: int  # appearance seed: the identity, or a fresh one for each distractor/junk tracklet
    camid: int
    number: int  # tracklet number within the identity
    length: int
    size: tuple = (256, 128)
    folders: list = field(default_factory=list)  # where the frames go (DukeV queries go twice)


def _rng(seed: int, *what: int) -> np.random.Generator:
    return np.random.default_rng([seed, *what])


def _lengths(rng: np.random.Generator, count: int, min_len: int, max_len: int) -> list[int]:
    # Log-uniform: many short tracklets and a long tail, like the real datasets.
    return [int(round(np.exp(rng.uniform(np.log(min_len), np.log(max_len + 0.5))))) for _ in range(count)]


def _camera_subsets(rng, num_cameras: int, multi: bool) -> list[int]:
    k = int(rng.integers(2, min(4, num_cameras) + 1)) if multi else 1
    return sorted(int(c) for c in rng.choice(np.arange(1, num_cameras + 1), size=k, replace=False))


def _identity_tracks(rng, pid: int, cameras: list[int]) -> list[TrackPlan]:
    """One or two tracklets per camera; lengths are drawn later for the whole split."""
    tracks, number = [], 1
    for cam in cameras:
        for _ in range(int(rng.integers(1, 3))):
            tracks.append(TrackPlan(pid=pid, person=pid, camid=cam, number=number, length=0))
            number += 1
    return tracks


def _force_extremes(tracks: list[TrackPlan], min_len: int, max_len: int) -> None:
    tracks[0].length = min_len
    tracks[-1].length = max_len


# ----------------------------------------------------------------------------------------------------------
# MARS
# ----------------------------------------------------------------------------------------------------------

def mars_name(pid: int, camid: int, number: int, frame: int) -> str:
    folder = "00-1" if pid == -1 else f"{pid:04d}"
    return f"{folder}C{camid}T{number:04d}F{frame:03d}.jpg"


def plan_mars(num_ids: int, seed: int, min_len: int, max_len: int):
    """Train/test tracklets, and the test rows that are queries (one per camera of each multi-camera id)."""
    rng = _rng(seed, 0)
    num_train = num_ids // 2
    train_pids = [2 * i + 1 for i in range(num_train)]  # MARS: train ids odd, test ids even
    test_pids = [2 * i + 2 for i in range(num_ids - num_train)]
    train = [t for pid in train_pids for t in _identity_tracks(rng, pid, _camera_subsets(rng, MARS_CAMERAS, True))]
    test = []
    for k, pid in enumerate(test_pids):
        multi = k % 8 != 7  # a few single-camera ids: they get no query, like the real MARS
        test += _identity_tracks(rng, pid, _camera_subsets(rng, MARS_CAMERAS, multi))
    # Distractors (0000) are other people, junk (00-1) bad detections; each tracklet its own appearance.
    for folder_pid, count in ((0, max(2, num_ids // 8)), (-1, max(2, num_ids // 10))):
        for number in range(1, count + 1):
            cam = int(rng.integers(1, MARS_CAMERAS + 1))
            test.append(TrackPlan(pid=folder_pid, person=100000 + len(test), camid=cam, number=number, length=0))
    for tracks in (train, test):
        for t, n in zip(tracks, _lengths(rng, len(tracks), min_len, max_len)):
            t.length = n
        _force_extremes(tracks, min_len, max_len)
    for t in train:
        t.folders = [f"bbox_train/{t.pid:04d}"]
    for t in test:
        t.folders = [f"bbox_test/{'00-1' if t.pid == -1 else f'{t.pid:04d}'}"]
    # Rows follow the name list: identity folders in ASCII order ('00-1' < '0000' < '0002'), then file names.
    order = lambda t: (t.folders[0], mars_name(t.pid, t.camid, t.number, 1))  # noqa: E731
    train.sort(key=order)
    test.sort(key=order)
    queries = []
    by_pid: dict[int, dict[int, list[int]]] = {}
    for row, t in enumerate(test, start=1):
        if t.pid > 0:
            by_pid.setdefault(t.pid, {}).setdefault(t.camid, []).append(row)
    for pid in sorted(by_pid):
        if len(by_pid[pid]) > 1:
            queries += [int(rng.choice(rows)) for _, rows in sorted(by_pid[pid].items())]
    return train, test, sorted(queries)


def _track_table(tracks: list[TrackPlan]) -> np.ndarray:
    """[start, end, pid, camera] rows, 1-based inclusive line numbers into the name list."""
    rows, start = [], 1
    for t in tracks:
        rows.append([start, start + t.length - 1, t.pid, t.camid])
        start += t.length
    return np.array(rows, dtype=np.int32).reshape(-1, 4)


def write_mars(out: Path, num_ids: int, seed: int, min_len: int, max_len: int, progress=None) -> dict:
    if max_len > 999:
        raise ValueError("--max-len: MARS frame numbers have 3 digits, so tracklets hold at most 999 frames")
    train, test, queries = plan_mars(num_ids, seed, min_len, max_len)
    frames = _render_all(out, train + test, seed, lambda t, f: mars_name(t.pid, t.camid, t.number, f), progress)
    info = out / "info"
    info.mkdir(parents=True, exist_ok=True)
    for fname, tracks in (("train_name.txt", train), ("test_name.txt", test)):
        names = [mars_name(t.pid, t.camid, t.number, i + 1) for t in tracks for i in range(t.length)]
        (info / fname).write_bytes("".join(n + "\r\n" for n in names).encode("ascii"))  # CRLF like the original
    (info / "tracks_train_info.mat").write_bytes(mat_bytes("track_train_info", _track_table(train)))
    (info / "tracks_test_info.mat").write_bytes(mat_bytes("track_test_info", _track_table(test)))
    (info / "query_IDX.mat").write_bytes(mat_bytes("query_IDX", np.array([queries], dtype=np.uint16)))
    return {"frames": frames, "train_tracklets": len(train), "test_tracklets": len(test), "queries": len(queries)}


# ----------------------------------------------------------------------------------------------------------
# DukeMTMC-VideoReID
# ----------------------------------------------------------------------------------------------------------

def plan_dukev(num_ids: int, seed: int, min_len: int, max_len: int):
    rng = _rng(seed, 0)
    num_train = num_ids // 2
    num_distractors = max(1, (num_ids - num_train) // 2)  # gallery-only identities (408 of 1,110 in DukeV)
    pids = sorted(int(p) for p in rng.choice(np.arange(1, 10000), size=num_ids + num_distractors, replace=False))
    order = rng.permutation(len(pids))
    train_pids = sorted(pids[i] for i in order[:num_train])
    test_pids = sorted(pids[i] for i in order[num_train:num_ids])
    distractor_pids = sorted(pids[i] for i in order[num_ids:])
    train = [t for pid in train_pids for t in _identity_tracks(rng, pid, _camera_subsets(rng, DUKEV_CAMERAS, True))]
    gallery = []
    for pid in test_pids + distractor_pids:
        gallery += _identity_tracks(rng, pid, _camera_subsets(rng, DUKEV_CAMERAS, pid in test_pids))
    for tracks in (train, gallery):
        for t, n in zip(tracks, _lengths(rng, len(tracks), min_len, max_len)):
            t.length = n
            t.size = (int(rng.integers(150, 320)), 0)
            t.size = (t.size[0], int(t.size[0] * rng.uniform(0.35, 0.5)))
        _force_extremes(tracks, min_len, max_len)
    for t in train:
        t.folders = [f"train/{t.pid:04d}/{t.number:04d}"]
    for t in gallery:
        t.folders = [f"gallery/{t.pid:04d}/{t.number:04d}"]
    # One query per test identity; the same tracklet folder stays in the gallery, as in DukeV.
    for pid in test_pids:
        mine = [t for t in gallery if t.pid == pid]
        chosen = mine[int(rng.integers(len(mine)))]
        chosen.folders.insert(0, f"query/{pid:04d}/{chosen.number:04d}")
    return train, gallery


def write_dukev(out: Path, num_ids: int, seed: int, min_len: int, max_len: int, progress=None) -> dict:
    if max_len > 9999:
        raise ValueError("--max-len: DukeV frame indices have 4 digits, so tracklets hold at most 9,999 frames")
    train, gallery = plan_dukev(num_ids, seed, min_len, max_len)
    starts = {id(t): int(_rng(seed, 3, i).integers(1, 90000)) for i, t in enumerate(train + gallery)}

    def name(t: TrackPlan, frame: int) -> str:  # frame is 1-based
        return f"{t.pid:04d}_C{t.camid}_F{frame:04d}_X{starts[id(t)] + frame - 1}.jpg"

    frames = _render_all(out, train + gallery, seed, name, progress)
    queries = sum(len(t.folders) > 1 for t in gallery)
    return {"frames": frames, "train_tracklets": len(train), "gallery_tracklets": len(gallery), "queries": queries}


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------

def _render_all(out: Path, tracks: list[TrackPlan], seed: int, name_fn, progress) -> int:
    """Render and write every frame; `name_fn(track, frame_1_based)` gives the file name."""
    cameras: dict[int, object] = {}
    written = 0
    for ordinal, t in enumerate(tracks):
        if t.camid not in cameras:
            cameras[t.camid] = random_camera(_rng(seed, 1, t.camid))
        person = random_identity(_rng(seed, 2, t.person + 1000))
        renderer = TrackletRenderer(person, cameras[t.camid], _rng(seed, 4, ordinal), size=t.size)
        for folder in t.folders:
            (out / folder).mkdir(parents=True, exist_ok=True)
        for i in range(t.length):
            data = encode_jpeg(renderer.frame(i))
            fname = name_fn(t, i + 1)
            for folder in t.folders:
                fd = os.open(out / folder / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            written += 1
        if progress:
            progress(t.length)
    return written


def generate(layout: str, out: str | os.PathLike, num_ids: int, seed: int, min_len: int = 2,
             max_len: int = 120) -> dict:
    """Write a synthetic dataset tree; returns counts. Refuses a non-empty output folder."""
    if layout not in ("mars", "dukev"):
        raise ValueError(f"--layout must be 'mars' or 'dukev', got {layout!r}")
    if num_ids < 4:
        raise ValueError("--ids must be at least 4 (two train and two test identities)")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= --min-len <= --max-len, got {min_len} and {max_len}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; synthetic data goes into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(desc=f"synthetic {layout}", unit="frame", disable=None) as bar:
        writer = write_mars if layout == "mars" else write_dukev
        counts = writer(out, num_ids, seed, min_len, max_len, progress=bar.update)
    counts["seconds"] = time.perf_counter() - start
    counts["frames_per_s"] = counts["frames"] / max(counts["seconds"], 1e-9)
    return counts

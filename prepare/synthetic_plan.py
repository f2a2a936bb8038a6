"""What a synthetic dataset holds, decided before any pixel is drawn: every tracklet, its identity, camera,
length, folders and frame names, in the order of the real datasets' lists.

Two planners per layout: `--ids N` (the original small datasets: the same seed keeps giving the same bytes)
and exact split sizes (`SplitSizes`, e.g. MARS's real numbers). A plan holds tracklets, never frames, so a
MARS-sized plan is ~20,000 small records. Every random choice comes from a generator seeded by
(seed, what, which), and each tracklet carries its `ordinal`, the seed of its pixels: a worker can render
any tracklet alone and get the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prepare.synthetic_sizes import (DUKEV_CAMERAS, MARS_CAMERAS, MAX_PER_PAIR, SplitSizes, lengths_with_total,
                                     spread)

MEAN_CAMERAS = {"mars": 3.2, "dukev": 3.0}  # cameras per training identity (MARS: 1,980 queries / 626 ids)


@dataclass
class TrackPlan:
    """One tracklet to render: who, where, how long; `frame_name(layout, t, i)` names frame i."""
    pid: int  # identity in the file names (0 = distractor, -1 = junk on MARS)
    person: int  # appearance seed: the identity, or a fresh one for each distractor/junk tracklet
    camid: int
    number: int  # tracklet number within the identity
    length: int
    size: tuple = (256, 128)
    folders: list = field(default_factory=list)  # where the frames go (DukeV queries go twice)
    ordinal: int = 0  # position in train + test: seeds the tracklet's pixels
    x_start: int = 0  # DukeV: original video frame number of the first frame
    first_frame: int = 1  # DukeV quirk: some distributed tracklets start at F0002
    old_name: bool = False  # DukeV quirk: the older 0001C6F0099X30823.jpg naming
    prefix: str = ""  # LS-VID: the frame names' common start (the list file's path prefix, without its folder)


@dataclass
class Plan:
    layout: str
    train: list  # TrackPlans in name-list order
    test: list  # MARS: bbox_test rows in order; DukeV: gallery tracklets (queries are extra folders)
    queries: list  # MARS: 1-based rows of `test` that are queries; DukeV: empty
    meta: dict = field(default_factory=dict)  # iLIDS-VID, PRID-2011, LS-VID: their split / query files' content

    @property
    def tracks(self) -> list:
        return self.train + self.test

    @property
    def frames(self) -> int:
        return sum(t.length for t in self.tracks)

    @property
    def files(self) -> int:
        return sum(t.length * len(t.folders) for t in self.tracks)


def rng_for(seed: int, *what: int) -> np.random.Generator:
    return np.random.default_rng([seed, *what])


def mars_name(pid: int, camid: int, number: int, frame: int) -> str:
    folder = "00-1" if pid == -1 else f"{pid:04d}"
    return f"{folder}C{camid}T{number:04d}F{frame:03d}.jpg"


def frame_name(layout: str, t: TrackPlan, i: int) -> str:
    """File name of frame i (0-based) of tracklet t."""
    if layout in ("ilidsvid", "prid2011", "lsvid"):
        from prepare.synthetic_layouts import frame_name as layout_frame_name

        return layout_frame_name(t, layout, i)
    if layout == "mars":
        return mars_name(t.pid, t.camid, t.number, i + 1)
    frame, x = t.first_frame + i, t.x_start + i
    if t.old_name:  # the older DukeV naming, e.g. 0001C6F0099X30823.jpg
        return f"{t.pid:04d}C{t.camid}F{frame:04d}X{x}.jpg"
    return f"{t.pid:04d}_C{t.camid}_F{frame:04d}_X{x}.jpg"


# ----------------------------------------------------------------------------------------------------------
# --ids N: the original planners (unchanged: the same seed gives the same bytes as before)
# ----------------------------------------------------------------------------------------------------------

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


def plan_mars_ids(num_ids: int, seed: int, min_len: int, max_len: int) -> Plan:
    """Train/test tracklets, and the test rows that are queries (one per camera of each multi-camera id)."""
    rng = rng_for(seed, 0)
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
    return _finish_mars(train, test, rng)


def plan_dukev_ids(num_ids: int, seed: int, min_len: int, max_len: int) -> Plan:
    rng = rng_for(seed, 0)
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
    return _finish_dukev(train, gallery, test_pids, rng, seed)


# ----------------------------------------------------------------------------------------------------------
# Exact split sizes
# ----------------------------------------------------------------------------------------------------------

def _identities(rng, pids: list[int], cams_per_id: np.ndarray, tracklets: int, num_cameras: int) -> list[TrackPlan]:
    """Tracklets of identities seen by `cams_per_id` random cameras, `tracklets` spread over (id, camera)."""
    cameras = [sorted(int(c) for c in rng.choice(np.arange(1, num_cameras + 1), size=int(k), replace=False))
               for k in cams_per_id]
    per_pair = iter(spread(rng, tracklets, int(cams_per_id.sum()), 1, MAX_PER_PAIR))
    tracks = []
    for pid, cams in zip(pids, cameras):
        number = 1
        for cam in cams:
            for _ in range(int(next(per_pair))):
                tracks.append(TrackPlan(pid=pid, person=pid, camid=cam, number=number, length=0))
                number += 1
    return tracks


def _train_cameras(rng, layout: str, ids: int, tracklets: int, num_cameras: int) -> np.ndarray:
    pairs = min(max(int(round(ids * MEAN_CAMERAS[layout])), 2 * ids), tracklets, num_cameras * ids)
    return spread(rng, pairs, ids, 2, num_cameras)


def _set_lengths(rng, tracks: list[TrackPlan], frames: int, s: SplitSizes) -> None:
    for t, n in zip(tracks, lengths_with_total(rng, len(tracks), frames, s.min_len, s.max_len)):
        t.length = int(n)


def plan_mars_sized(s: SplitSizes, seed: int) -> Plan:
    rng = rng_for(seed, 10)
    train_pids = [2 * i + 1 for i in range(s.train_ids)]  # MARS: train ids odd, test ids even
    train = _identities(rng, train_pids, _train_cameras(rng, "mars", s.train_ids, s.train_tracklets, MARS_CAMERAS),
                        s.train_tracklets, MARS_CAMERAS)
    test_pids = [2 * i + 2 for i in range(s.test_ids)]
    # Single-camera ids get no query; the others have one query per camera, so their cameras sum to --queries.
    singles = set(rng.choice(s.test_ids, size=s.single_camera_ids, replace=False).tolist())
    multi = spread(rng, s.queries, s.test_ids - len(singles), 2, MARS_CAMERAS)
    cams = np.ones(s.test_ids, dtype=np.int64)
    cams[[k for k in range(s.test_ids) if k not in singles]] = multi
    test = _identities(rng, test_pids, cams, s.test_tracklets - s.distractors - s.junk, MARS_CAMERAS)
    for folder_pid, count, person0 in ((0, s.distractors, 100000), (-1, s.junk, 200000)):
        for number, cam in enumerate(rng.integers(1, MARS_CAMERAS + 1, count).tolist(), start=1):
            test.append(TrackPlan(pid=folder_pid, person=person0 + number, camid=cam, number=number, length=0))
    _set_lengths(rng, train, s.train_frames, s)
    _set_lengths(rng, test, s.test_frames, s)
    return _finish_mars(train, test, rng)


def plan_dukev_sized(s: SplitSizes, seed: int) -> Plan:
    rng = rng_for(seed, 10)
    total = s.train_ids + s.test_ids + s.distractors
    pids = rng.permutation(np.sort(rng.choice(np.arange(1, 10000), size=total, replace=False))).tolist()
    train_pids = sorted(pids[:s.train_ids])
    test_pids = sorted(pids[s.train_ids:s.train_ids + s.test_ids])
    distractor_pids = sorted(pids[s.train_ids + s.test_ids:])
    train = _identities(rng, train_pids, _train_cameras(rng, "dukev", s.train_ids, s.train_tracklets, DUKEV_CAMERAS),
                        s.train_tracklets, DUKEV_CAMERAS)
    # Test ids are seen by 2+ cameras (the query needs a match elsewhere), distractor ids by one.
    test_tracklets = s.test_tracklets - s.distractors
    cams = np.concatenate([_train_cameras(rng, "dukev", s.test_ids, test_tracklets, DUKEV_CAMERAS),
                           np.ones(s.distractors, dtype=np.int64)])
    gallery = _identities(rng, test_pids + distractor_pids, cams, s.test_tracklets, DUKEV_CAMERAS)
    gallery.sort(key=lambda t: (t.pid, t.number))
    _set_lengths(rng, train, s.train_frames, s)
    _set_lengths(rng, gallery, s.test_frames, s)
    for t in train + gallery:  # crops come in many sizes (h, w)
        h = int(rng.integers(150, 320))
        t.size = (h, int(h * rng.uniform(0.35, 0.5)))
    return _finish_dukev(train, gallery, test_pids, rng, seed)


# ----------------------------------------------------------------------------------------------------------
# Shared finishing: folders, order, queries
# ----------------------------------------------------------------------------------------------------------

def _finish_mars(train: list[TrackPlan], test: list[TrackPlan], rng) -> Plan:
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
    for ordinal, t in enumerate(train + test):
        t.ordinal = ordinal
    return Plan("mars", train, test, sorted(queries))


def _finish_dukev(train: list[TrackPlan], gallery: list[TrackPlan], test_pids: list[int], rng, seed: int) -> Plan:
    for t in train:
        t.folders = [f"train/{t.pid:04d}/{t.number:04d}"]
    for t in gallery:
        t.folders = [f"gallery/{t.pid:04d}/{t.number:04d}"]
    # One query per test identity; the same tracklet folder stays in the gallery, as in DukeV.
    by_pid: dict[int, list[TrackPlan]] = {}
    for t in gallery:
        by_pid.setdefault(t.pid, []).append(t)
    for pid in test_pids:
        mine = by_pid[pid]
        chosen = mine[int(rng.integers(len(mine)))]
        chosen.folders.insert(0, f"query/{pid:04d}/{chosen.number:04d}")
    for ordinal, t in enumerate(train + gallery):
        t.ordinal = ordinal
        t.x_start = int(rng_for(seed, 3, ordinal).integers(1, 90000))
    return Plan("dukev", train, gallery, [])


def add_dukev_quirks(plan: Plan, seed: int, f0002: float, old_names: float) -> None:
    """Mark round(fraction x tracklets) random tracklets (at least one if the fraction is > 0) as starting at
    F0002, and as named the older way; each from its own stream, so other bytes stay as they were."""
    tracks = plan.tracks
    for stream, fraction, apply in ((5, f0002, lambda t: setattr(t, "first_frame", 2)),
                                    (6, old_names, lambda t: setattr(t, "old_name", True))):
        if not fraction:
            continue
        count = min(len(tracks), max(1, int(round(fraction * len(tracks)))))
        for i in sorted(rng_for(seed, stream).permutation(len(tracks))[:count].tolist()):
            apply(tracks[i])

"""Split sizes for synthetic datasets: the real MARS and DukeV numbers, scaling, and the feasibility checks.

`SplitSizes` fixes identities, tracklets and frames per split exactly; the planner (`synthetic_plan.py`)
draws everything else. `check` explains, in one line, why a combination cannot be built and what to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

MARS_CAMERAS, DUKEV_CAMERAS = 6, 8
MAX_PER_PAIR = 1666  # tracklets of one identity in one camera: keeps a MARS identity within 6 x 1666 < 10,000 (T####)
# Log-normal spread of tracklet lengths: MARS has median ~33 and 95th percentile ~180 (design §2), so
# sigma = ln(180 / 33) / 1.645 ~ 1.03. The scale is then fitted to the requested mean (frames / tracklets).
LENGTH_SIGMA = 1.03


@dataclass(frozen=True)
class SplitSizes:
    train_ids: int
    train_tracklets: int
    train_frames: int
    test_ids: int  # MARS: real test identities (not counting 0000 / 00-1); DukeV: query identities
    test_tracklets: int  # MARS: every bbox_test tracklet, distractors and junk included; DukeV: gallery tracklets
    test_frames: int  # frames of those tracklets (DukeV query folders are copies and not counted)
    queries: int  # MARS: one per camera of each multi-camera test identity; DukeV: one per test identity
    distractors: int  # MARS: tracklets in 0000, each another person; DukeV: gallery-only identities
    junk: int  # MARS: tracklets in 00-1 (bad detections); DukeV: 0
    single_camera_ids: int  # MARS: test identities seen by one camera (they get no query); DukeV: 0
    min_len: int  # shortest tracklet; one tracklet per split has exactly this length
    max_len: int  # longest tracklet; one tracklet per split has exactly this length

    def as_dict(self) -> dict:
        return asdict(self)


# MARS (design §2): 625 / 8,298 / 509,914 train; 12,180 test tracklets, 681,089 frames, 1,980 queries over 626
# of the 634 test ids. Junk = 12,180 - 11,310 (the `standard` gallery drops junk, design §5) = 870 tracklets.
# The MARS project reports 3,248 distractor tracklets; that they all sit in bbox_test/0000 is *unverified*.
MARS_REAL = SplitSizes(train_ids=625, train_tracklets=8298, train_frames=509914, test_ids=634, test_tracklets=12180,
                       test_frames=681089, queries=1980, distractors=3248, junk=870, single_camera_ids=8,
                       min_len=2, max_len=920)
# DukeV (Yu-Wu/DukeMTMC-VideoReID README): 702 ids, 2,196 tracklets, 369,656 frames for training; 445,764 frames
# of 2,636 gallery tracklets over 702 test + 408 distractor ids; 702 queries. Length range *unverified*: 2-2,000.
DUKEV_REAL = SplitSizes(train_ids=702, train_tracklets=2196, train_frames=369656, test_ids=702, test_tracklets=2636,
                        test_frames=445764, queries=702, distractors=408, junk=0, single_camera_ids=0,
                        min_len=2, max_len=2000)
REAL = {"mars": MARS_REAL, "dukev": DUKEV_REAL}
FIELDS = tuple(SplitSizes.__dataclass_fields__)
OPTION_HELP = {  # the command line's per-size options (the first 9 fields)
    "train_ids": "training identities", "train_tracklets": "training tracklets", "train_frames": "training frames",
    "test_ids": "MARS: real test identities; DukeV: query identities",
    "test_tracklets": "MARS: all bbox_test tracklets; DukeV: gallery tracklets",
    "test_frames": "frames of those tracklets (DukeV query copies not counted)",
    "queries": "MARS: query tracklets, one per camera of each multi-camera test id (DukeV: = --test-ids)",
    "distractors": "MARS: tracklets in 0000; DukeV: gallery-only identities", "junk": "MARS: tracklets in 00-1",
}


def scaled(layout: str, s: SplitSizes, train: float, test: float | None = None) -> SplitSizes:
    """Counts times `train` (train split) and `test` (test split, default `train`), kept buildable where the
    structure needs it (at least 2 identities per split, 2 cameras per identity, MARS queries 2-6 per id)."""
    test = train if test is None else test
    if train <= 0 or test <= 0:
        raise ValueError("--scale / --test-scale must be positive")

    def n(value: int, factor: float, least: int = 1) -> int:
        return 0 if value == 0 else max(least, int(round(value * factor)))

    train_ids, test_ids = n(s.train_ids, train, 2), n(s.test_ids, test, 2)
    distractors, junk = n(s.distractors, test), n(s.junk, test)
    if layout == "mars":
        singles = min(n(s.single_camera_ids, test), test_ids - 1)
        multi = test_ids - singles
        queries = min(max(n(s.queries, test), 2 * multi), MARS_CAMERAS * multi)
        floor = queries + singles + distractors + junk  # one tracklet per (identity, camera) at least
    else:
        singles, queries = 0, test_ids  # DukeV: one query per test identity
        floor = 2 * test_ids + distractors
    return replace(s, train_ids=train_ids, train_tracklets=max(n(s.train_tracklets, train), 2 * train_ids),
                   train_frames=n(s.train_frames, train), test_ids=test_ids,
                   test_tracklets=max(n(s.test_tracklets, test), floor), test_frames=n(s.test_frames, test),
                   queries=queries, distractors=distractors, junk=junk, single_camera_ids=singles)


def check(layout: str, s: SplitSizes, first_frame_shift: int = 0) -> None:
    """Raise ValueError naming the first size that cannot be built, and what to change."""
    if any(v < 0 for v in asdict(s).values()):
        raise ValueError("split sizes cannot be negative")
    if not 1 <= s.min_len <= s.max_len:
        raise ValueError(f"need 1 <= --min-len <= --max-len, got {s.min_len} and {s.max_len}")
    digits_limit = 999 if layout == "mars" else 9999 - first_frame_shift
    if s.max_len > digits_limit:
        raise ValueError(f"--max-len {s.max_len}: {layout} frame numbers have {3 if layout == 'mars' else 4} digits, "
                         f"so tracklets hold at most {digits_limit:,} frames here")
    for split in ("train", "test"):
        if getattr(s, f"{split}_ids") < 2:
            raise ValueError(f"--{split}-ids must be at least 2")
    if s.train_tracklets < 2 * s.train_ids:
        raise ValueError(f"--train-tracklets {s.train_tracklets:,} is fewer than 2 per identity "
                         f"({s.train_ids:,} ids, each seen by at least 2 cameras): raise it or lower --train-ids")
    cameras = MARS_CAMERAS if layout == "mars" else DUKEV_CAMERAS
    if s.train_tracklets > s.train_ids * cameras * MAX_PER_PAIR:
        raise ValueError(f"--train-tracklets {s.train_tracklets:,}: more than {cameras * MAX_PER_PAIR:,} per identity")
    if layout == "mars":
        _check_mars_test(s)
    else:
        _check_dukev_test(s)
    for split in ("train", "test"):
        n, frames = getattr(s, f"{split}_tracklets"), getattr(s, f"{split}_frames")
        low, high = (n - 1) * s.min_len + s.max_len, s.min_len + (n - 1) * s.max_len
        if not low <= frames <= high:
            raise ValueError(f"--{split}-frames {frames:,} cannot be split into {n:,} tracklets of {s.min_len}-"
                             f"{s.max_len} frames with one of each extreme (possible: {low:,} to {high:,}): change "
                             f"--{split}-frames, --{split}-tracklets, --min-len or --max-len")


def _check_mars_test(s: SplitSizes) -> None:
    multi = s.test_ids - s.single_camera_ids
    if s.single_camera_ids < 0 or multi < 1:
        raise ValueError(f"{s.single_camera_ids} single-camera test ids leave no identity for the queries")
    if not 2 * multi <= s.queries <= MARS_CAMERAS * multi:
        raise ValueError(f"--queries {s.queries:,}: MARS has one query per camera of each multi-camera test id, so "
                         f"{multi:,} such ids give {2 * multi:,} to {MARS_CAMERAS * multi:,} queries: change "
                         "--queries or --test-ids")
    if 2 * max(s.train_ids, s.test_ids) > 9999:
        raise ValueError("MARS ids are 4 digits (train odd, test even): at most 4,999 ids per split")
    if max(s.distractors, s.junk) > 9999:
        raise ValueError("--distractors / --junk: MARS tracklet numbers have 4 digits, at most 9,999 each")
    pairs = s.queries + s.single_camera_ids  # (identity, camera) pairs, each holding at least one tracklet
    real = s.test_tracklets - s.distractors - s.junk
    if real < pairs:
        raise ValueError(f"--test-tracklets {s.test_tracklets:,} minus {s.distractors:,} distractors and "
                         f"{s.junk:,} junk leaves {real:,} for the test ids, fewer than their {pairs:,} cameras (one per query, "
                         "plus the single-camera ids): raise --test-tracklets")
    if real > pairs * MAX_PER_PAIR:
        raise ValueError(f"--test-tracklets {s.test_tracklets:,}: more than {MAX_PER_PAIR:,} per identity and camera")
    if s.test_tracklets > 65535:
        raise ValueError("--test-tracklets: MARS's query_IDX.mat stores rows as uint16, at most 65,535 tracklets")


def _check_dukev_test(s: SplitSizes) -> None:
    if s.queries != s.test_ids or s.junk or s.single_camera_ids:
        raise ValueError("DukeV has one query per test identity and no junk: leave --queries and --junk unset")
    if s.train_ids + s.test_ids + s.distractors > 9999:
        raise ValueError("DukeV ids are 4 digits: train + test + distractor ids must stay below 10,000")
    needed = 2 * s.test_ids + s.distractors
    if s.test_tracklets < needed:
        raise ValueError(f"--test-tracklets {s.test_tracklets:,} is fewer than the {needed:,} the gallery needs (2 "
                         f"cameras per test id, one tracklet per distractor id): raise it or lower --test-ids / "
                         "--distractors")
    if s.test_tracklets > (s.test_ids + s.distractors) * DUKEV_CAMERAS * MAX_PER_PAIR:
        raise ValueError(f"--test-tracklets {s.test_tracklets:,}: more than {DUKEV_CAMERAS * MAX_PER_PAIR:,} per id")


def spread(rng: np.random.Generator, total: int, n: int, lo: int, hi: int) -> np.ndarray:
    """n random integers in [lo, hi] summing to `total` (uniform multinomial share of the excess)."""
    if not n * lo <= total <= n * hi:
        raise ValueError(f"cannot spread {total} over {n} parts of {lo}..{hi}")
    counts = np.full(n, lo, dtype=np.int64)
    left = total - n * lo
    while left:
        room = counts < hi
        counts[room] += rng.multinomial(left, np.full(room.sum(), 1 / room.sum()))
        left = int(np.maximum(counts - hi, 0).sum())
        np.minimum(counts, hi, out=counts)
    return counts


def lengths_with_total(rng: np.random.Generator, n: int, total: int, lo: int, hi: int) -> np.ndarray:
    """n tracklet lengths in [lo, hi] summing to `total`, log-normal in shape; the first is `lo` and the last
    `hi`, so both extremes always occur. A scale factor fits the mean; rounding then keeps the exact total."""
    lengths = np.empty(n, dtype=np.int64)
    lengths[0], lengths[-1] = lo, hi
    m, target = n - 2, total - lo - hi
    if m == 0:
        return lengths
    shape = rng.lognormal(0.0, LENGTH_SIGMA, m)
    a, b = 0.0, hi / shape.min()  # sum(clip(s * shape)) is monotone in s: m*lo at s=0, m*hi at s=b
    for _ in range(100):
        s = (a + b) / 2
        if np.clip(s * shape, lo, hi).sum() < target:
            a = s
        else:
            b = s
    x = np.clip(b * shape, lo, hi)
    body = np.floor(x).astype(np.int64)
    # Hand the missing frames to the largest fractional parts (stable order: deterministic), then fix any
    # leftover from float error one frame at a time where there is room.
    order = np.argsort(-(x - body), kind="stable")
    missing = target - int(body.sum())
    for i in order:
        if missing == 0:
            break
        step = 1 if missing > 0 else -1
        if lo <= body[i] + step <= hi:
            body[i] += step
            missing -= step
    if missing:
        raise ValueError(f"cannot split {total} frames into {n} tracklets of {lo}..{hi}")
    lengths[1:-1] = body
    return lengths

"""The per-tracklet label set that every evaluation feature travels with.

Row i of a feature matrix belongs to tracklet i of a `Tracklets`: the protocols pick their queries and
galleries from these labels, never from positions ("the first num_query rows").

How the two datasets map onto it (design §2):
- MARS: one record per test tracklet (12,180). `in_gallery` is True for all of them: the MARS gallery is
  the whole test set, junk (−1) and distractors (0) included; `is_query` marks the 1,980 rows of
  `query_IDX`. A query is thus both a query and a gallery record (the MATLAB code does exactly this).
- DukeV: one record per tracklet *as shipped*: 702 `query/` records (is_query, not in_gallery) and 2,636
  `gallery/` records (in_gallery), which contain copies of the queries under different keys. The copies
  are same-id same-camera junk for their query in every protocol.
"""

from dataclasses import dataclass

import numpy as np

JUNK_PID = -1  # MARS bbox_test/00-1: ignored by every protocol
DISTRACTOR_PID = 0  # MARS bbox_test/0000: ordinary negatives in the gallery


@dataclass(frozen=True)
class Tracklets:
    keys: tuple[str, ...]  # unique tracklet names, e.g. "bbox_test/0002/0002C1T0001"
    pids: np.ndarray  # (N,) int64 identity; JUNK_PID = junk, DISTRACTOR_PID = distractor
    camids: np.ndarray  # (N,) int64 camera
    is_query: np.ndarray  # (N,) bool: this tracklet is a query
    in_gallery: np.ndarray  # (N,) bool: this tracklet is in the dataset's gallery as shipped

    def __post_init__(self):
        # Normalise types once so the protocols can trust them (frozen: set through object).
        n = len(self.keys)
        object.__setattr__(self, "keys", tuple(str(k) for k in self.keys))
        for name, dtype in (("pids", np.int64), ("camids", np.int64), ("is_query", bool), ("in_gallery", bool)):
            arr = np.asarray(getattr(self, name))
            if arr.shape != (n,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({n},) like keys")
            if dtype is bool and arr.dtype != bool:
                raise ValueError(f"{name} must be boolean, got {arr.dtype}")  # 0/1 ints are too easy to mix up
            arr = arr.astype(dtype)
            arr.flags.writeable = False  # a shared label set must not change under a protocol
            object.__setattr__(self, name, arr)
        self.validate()

    def validate(self) -> None:
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("tracklet keys must be unique: a key identifies one feature row")
        if not self.is_query.any():
            raise ValueError("no query tracklets (is_query is all False)")
        bad = np.isin(self.pids[self.is_query], (JUNK_PID, DISTRACTOR_PID))
        if bad.any():
            raise ValueError(f"{int(bad.sum())} queries carry the junk ({JUNK_PID}) or distractor "
                             f"({DISTRACTOR_PID}) label; those tracklets have no identity to retrieve")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def query_indices(self) -> np.ndarray:
        """Record indices of the queries, in record order: row r of a distance matrix is query_indices[r]."""
        return np.flatnonzero(self.is_query)

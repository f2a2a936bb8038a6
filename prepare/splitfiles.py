"""The split and query files of iLIDS-VID, PRID-2011 and LS-VID, read and checked (facts: /work/notes, docs).

- iLIDS-VID `train_test_splits_ilidsvid.mat`: `ls_set`, 10 × (number of persons), each row a permutation of
  the 1-based positions of the name-sorted person folders; split i = `ls_set[i, :n/2]` test, the rest train
  (torchreid's `split_id = i`). MATLAB v5 files are read with scipy, v7.3 (HDF5) with h5py (transposed there).
- torchreid's split JSON files (`splits.json` of iLIDS-VID, `splits_prid2011.json`): a list of 10
  `{"train": [folder names], "test": [folder names]}`.
- LS-VID `info_test.mat`: MATLAB v7.3 (HDF5), dataset `query` = 1-based rows of `list_seq_test.txt`.
Every problem is one PrepareError line naming the file and what was expected.
"""

from __future__ import annotations

import json

import numpy as np

from prepare.tracklet import PrepareError
from stenvan.shards import NUM_PERSON_SPLITS


def _hdf5(path: str) -> bool:
    import h5py

    try:
        return h5py.is_hdf5(path)
    except OSError:
        return False


def read_mat_variable(path: str, variable: str) -> np.ndarray:
    """A MATLAB variable as MATLAB sees it (rows × columns), from a v5 or a v7.3 (HDF5) MAT-file."""
    if _hdf5(path):
        import h5py

        with h5py.File(path, "r") as f:
            if variable not in f:
                raise PrepareError(f"{path}: variable {variable!r} not found (has {sorted(f)}); use the file as "
                                   "distributed")
            return np.asarray(f[variable]).T  # HDF5 holds MATLAB's arrays transposed
    from scipy.io import loadmat

    try:
        contents = loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises many types for a broken file
        raise PrepareError(f"{path}: cannot be read as a MAT-file ({e}); restore it from the dataset archive") from None
    if variable not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise PrepareError(f"{path}: variable {variable!r} not found (has {found}); use the file as distributed")
    return contents[variable]


def _integers(array: np.ndarray, path: str, what: str) -> np.ndarray:
    if array.dtype.kind not in "iuf" or (array.dtype.kind == "f" and not np.all(np.isfinite(array))) \
            or not np.array_equal(array, np.round(array)):
        raise PrepareError(f"{path}: {what} must hold whole numbers (1-based positions), got {array.dtype} values "
                           "that are not; use the file as distributed")
    return np.round(array).astype(np.int64)


def read_ls_set(path: str, num_persons: int) -> np.ndarray:
    """`ls_set` of iLIDS-VID's split file, checked: (10, num_persons), each row a permutation of 1..num_persons."""
    ls_set = _integers(read_mat_variable(path, "ls_set"), path, "ls_set")
    if ls_set.shape != (NUM_PERSON_SPLITS, num_persons):
        raise PrepareError(f"{path}: ls_set is {' x '.join(map(str, ls_set.shape))}, expected {NUM_PERSON_SPLITS} x "
                           f"{num_persons} (10 splits of the {num_persons} person folders found); the split file "
                           "does not belong to these sequences")
    expected = np.arange(1, num_persons + 1)
    for i, row in enumerate(ls_set):
        if not np.array_equal(np.sort(row), expected):
            raise PrepareError(f"{path}: ls_set row {i + 1} is not a permutation of 1..{num_persons} (the 1-based "
                               "positions of the name-sorted person folders); use the file as distributed")
    return ls_set


def ls_set_splits(ls_set: np.ndarray, persons: list[str]) -> list[dict]:
    """torchreid's convention: split i tests the persons at positions ls_set[i, :n/2] and trains on the rest."""
    half = len(persons) // 2
    return [{"train": sorted(persons[p - 1] for p in row[half:]), "test": sorted(persons[p - 1] for p in row[:half])}
            for row in ls_set.tolist()]


def read_split_json(path: str) -> list[dict]:
    """torchreid's split file: NUM_PERSON_SPLITS objects with disjoint "train" and "test" folder-name lists."""
    try:
        with open(path, encoding="utf-8") as f:
            splits = json.load(f)
    except FileNotFoundError:
        raise PrepareError(f"{path}: split file not found; give torchreid's splits_prid2011.json with --splits, or "
                           "leave --splits out") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: not a JSON split file ({e}); use torchreid's file as distributed") from None
    shape_ok = isinstance(splits, list) and len(splits) == NUM_PERSON_SPLITS and all(
        isinstance(s, dict) and all(isinstance(s.get(k), list) and all(isinstance(n, str) for n in s[k])
                                    for k in ("train", "test")) for s in splits)
    if not shape_ok:
        raise PrepareError(f"{path}: expected a list of {NUM_PERSON_SPLITS} objects {{\"train\": [folder names], "
                           "\"test\": [folder names]}} (torchreid's format)")
    for i, s in enumerate(splits):
        both = set(s["train"]) & set(s["test"])
        if both or not s["test"] or not s["train"]:
            raise PrepareError(f"{path}: split {i} " + (f"puts {sorted(both)[:3]} in both train and test" if both
                                                        else "has an empty train or test list"))
    return splits


def seeded_splits(persons: list[str], seed: int = 0) -> list[dict]:
    """NUM_PERSON_SPLITS random halves (test = the first n//2 of a seeded permutation), for a dataset whose
    published splits are not at hand."""
    rng = np.random.default_rng(seed)
    half = len(persons) // 2
    out = []
    for _ in range(NUM_PERSON_SPLITS):
        order = rng.permutation(len(persons))
        out.append({"train": sorted(persons[i] for i in order[half:]),
                    "test": sorted(persons[i] for i in order[:half])})
    return out


def read_query_rows(path: str, num_rows: int) -> list[int]:
    """LS-VID's `info_test.mat` (MATLAB v7.3 = HDF5): the `query` rows, 1-based, distinct, within the test list."""
    if not _hdf5(path):
        raise PrepareError(f"{path}: not an HDF5 file; LS-VID's info_test.mat is a MATLAB v7.3 (HDF5) file holding "
                           "`query`; restore it from the dataset archive")
    rows = _integers(read_mat_variable(path, "query"), path, "query").reshape(-1).tolist()
    if not rows or any(not 1 <= r <= num_rows for r in rows) or len(set(rows)) != len(rows):
        raise PrepareError(f"{path}: query must hold distinct 1-based rows of list_seq_test.txt (1..{num_rows}); the "
                           "file does not belong to this list")
    return rows

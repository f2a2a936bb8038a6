"""Read a MARS tree (bbox_train/, bbox_test/, info/) into tracklets, checking it on the way (design §2).

The info files define the dataset: tracklets are rows of `track_{train,test}_info` ([start, end, pid, camera],
1-based inclusive line numbers into the name lists) and queries are the 1-based rows of `query_IDX`.
"""

from __future__ import annotations

import os
import re

import numpy as np

from prepare.tracklet import PrepareError, Tracklet, list_entries, numeric_name, stat_frames

NAME = re.compile(r"^(\d{4}|00-1)C(\d)T(\d{4})F(\d{3})\.jpg$", re.ASCII)  # ASCII digits only
INFO_FILES = {"train_name.txt": None, "test_name.txt": None, "tracks_train_info.mat": "track_train_info",
              "tracks_test_info.mat": "track_test_info", "query_IDX.mat": "query_IDX"}


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise PrepareError(f"{path}: {what} folder not found; pass the MARS root with --data-dir "
                           "(it holds bbox_train/ and bbox_test/) and the info folder with --info-dir")


def read_names(path: str) -> list[str]:
    with open(path, "rb") as f:
        text = f.read().decode("ascii", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_mat(path: str, variable: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        contents = loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises many types for a broken file
        raise PrepareError(f"{path}: cannot read as a MAT-file ({e}); restore it from the MARS-evaluation "
                           "project") from None
    if variable not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise PrepareError(f"{path}: variable {variable!r} not found (has {found}); use the original MARS info file")
    array = contents[variable]
    if array.dtype.kind not in "iu":
        raise PrepareError(f"{path}: {variable} is stored as {array.dtype}, not as integers; MARS info files store "
                           "integers (re-save with int32 storage or use the original file)")
    return array.astype(np.int64)


def _check_rows(rows: np.ndarray, names: list[str], path: str) -> None:
    if rows.ndim != 2 or rows.shape[1] != 4:
        raise PrepareError(f"{path}: expected an N×4 array [start, end, pid, camera], got shape {rows.shape}")
    expected_start = 1
    for i, (start, end, _pid, _cam) in enumerate(rows.tolist(), start=1):
        if start != expected_start or end < start or end > len(names):
            raise PrepareError(f"{path}: row {i} spans lines {start}..{end}, but rows must tile the "
                               f"{len(names)}-line name list contiguously from line 1 (expected start {expected_start})"
                               "; the info file does not belong to this name list")
        expected_start = end + 1
    if expected_start != len(names) + 1:
        raise PrepareError(f"{path}: rows end at line {expected_start - 1} but the name list has {len(names)} lines")


def _check_identity_folders(root: str, allow_junk: bool) -> None:
    """Identity folders are 4-digit ASCII numbers (or 00-1). An entry that cannot be examined (a symlink to a
    missing target) is not checked here: the info rows list its frames, which then are reported missing."""
    for entry in list_entries(root):
        if entry.kind != "folder":
            continue
        if not numeric_name(entry.name, 4) and not (allow_junk and entry.name == "00-1"):
            raise PrepareError(f"{entry.path}: identity folders must be 4-digit numbers"
                               f"{' (or 00-1 for junk)' if allow_junk else ''}; move this folder out of the dataset")


def _tracklets(rows, names, image_dir: str, group: str, splits_of, skip_bad: bool, skipped: list) -> list[Tracklet]:
    out = []
    for row, (start, end, pid, cam) in enumerate(rows.tolist(), start=1):
        frame_names = names[start - 1:end]
        parsed = [NAME.match(n) for n in frame_names]
        problem = None
        if not all(parsed):
            bad = frame_names[[m is None for m in parsed].index(True)]
            problem = f"{bad}: not a MARS frame name (PPPPCcTttttFfff.jpg)"
        else:
            ids = {(m.group(1), m.group(2), m.group(3)) for m in parsed}
            folder = "00-1" if pid == -1 else f"{pid:04d}"
            if len(ids) != 1:
                problem = (f"rows {start}..{end} mix identities/cameras/tracklets {sorted(ids)}; the frames of a "
                           "tracklet must agree")
            elif ids != {(folder, str(cam), parsed[0].group(3))}:
                problem = (f"frames {frame_names[0]}.. say identity {parsed[0].group(1)} camera {parsed[0].group(2)},"
                           f" the info row says identity {pid} camera {cam}")
        key = frame_names[0][:11] if parsed[0] else f"row{row}"
        paths = [os.path.join(image_dir, n[:4], n) for n in frame_names]
        stats = stat_frames(paths) if problem is None else problem
        if isinstance(stats, str):
            problem = stats
        if problem is not None:
            message = f"{image_dir} (info row {row}): {problem}"
            if not skip_bad:
                raise PrepareError(message + ("" if "--skip-bad" in message else
                                              "; fix the data or pass --skip-bad to skip this tracklet"))
            skipped.append({"key": key, "group": group, "reason": message})
            continue
        splits, flags = splits_of(row, pid)
        out.append(Tracklet(key=key, group=group, pid=pid, camid=cam, frames=paths, sizes=stats[0],
                            mtimes=stats[1], splits=splits, flags=flags))
    return out


def scan_mars(data_dir: str, info_dir: str, skip_bad: bool = False) -> tuple[list[Tracklet], list[dict]]:
    """All MARS tracklets (train, then test) and the list of skipped tracklets."""
    _require_dir(data_dir, "MARS data")
    _require_dir(info_dir, "MARS info")
    for sub in ("bbox_train", "bbox_test"):
        _require_dir(os.path.join(data_dir, sub), sub)
    for fname in INFO_FILES:
        if not os.path.isfile(os.path.join(info_dir, fname)):
            raise PrepareError(f"{os.path.join(info_dir, fname)}: info file not found; get the info/ folder from the "
                               "MARS-evaluation project and pass it with --info-dir")
    _check_identity_folders(os.path.join(data_dir, "bbox_train"), allow_junk=False)
    _check_identity_folders(os.path.join(data_dir, "bbox_test"), allow_junk=True)
    info = lambda f: os.path.join(info_dir, f)  # noqa: E731
    train_names, test_names = read_names(info("train_name.txt")), read_names(info("test_name.txt"))
    train_rows = read_mat(info("tracks_train_info.mat"), "track_train_info")
    test_rows = read_mat(info("tracks_test_info.mat"), "track_test_info")
    _check_rows(train_rows, train_names, info("tracks_train_info.mat"))
    _check_rows(test_rows, test_names, info("tracks_test_info.mat"))
    query_rows = read_mat(info("query_IDX.mat"), "query_IDX").reshape(-1).tolist()
    if any(not 1 <= q <= len(test_rows) for q in query_rows) or len(set(query_rows)) != len(query_rows):
        raise PrepareError(f"{info('query_IDX.mat')}: query_IDX must hold distinct 1-based rows of track_test_info "
                           f"(1..{len(test_rows)}); the file does not belong to this tracks_test_info.mat")
    queries = set(query_rows)

    def test_splits(row: int, pid: int):
        # Design §5: the MARS gallery is every test tracklet, each marked; queries are a subset of it.
        flags = {"query": row in queries, "junk": pid == -1, "distractor": pid == 0}
        return (("query", "gallery") if row in queries else ("gallery",)), flags

    skipped: list[dict] = []
    train = _tracklets(train_rows, train_names, os.path.join(data_dir, "bbox_train"), "train",
                       lambda row, pid: (("train",), {}), skip_bad, skipped)
    test = _tracklets(test_rows, test_names, os.path.join(data_dir, "bbox_test"), "test", test_splits, skip_bad,
                      skipped)
    keys = [t.key for t in train + test]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise PrepareError(f"{info_dir}: tracklet {dup} appears in two info rows; each tracklet must be listed once")
    return train + test, skipped

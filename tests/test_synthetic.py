"""The synthetic generator writes the real on-disk layouts, deterministically."""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from prepare.synthetic import generate


def tree_digest(root) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, mars_tree):
    generate("mars", tmp_path / "again", num_ids=8, seed=1, min_len=2, max_len=30)
    generate("mars", tmp_path / "other", num_ids=8, seed=2, min_len=2, max_len=30)
    assert tree_digest(tmp_path / "again") == tree_digest(mars_tree)
    assert tree_digest(tmp_path / "other") != tree_digest(mars_tree)


def test_mars_layout_matches_the_real_dataset(mars_tree):
    info = mars_tree / "info"
    for split in ("train", "test"):
        raw = (info / f"{split}_name.txt").read_bytes()
        assert raw.endswith(b"\r\n") and raw.count(b"\r\n") == raw.count(b"\n")  # CRLF line ends
        names = raw.decode("ascii").split("\r\n")[:-1]
        # ASCII order of identity folders then file names, every listed file present, 256x128 frames
        assert names == sorted(names)
        assert all(re.fullmatch(r"(\d{4}|00-1)C[1-6]T\d{4}F\d{3}\.jpg", n) for n in names)
        assert all((mars_tree / f"bbox_{split}" / n[:4] / n).is_file() for n in names)
        table = loadmat(info / f"tracks_{split}_info.mat")[f"track_{split}_info"]
        assert table.dtype == np.int32 and table.shape[1] == 4
        # MATLAB class double with an integer payload: mat_dtype=True gives what MATLAB would see
        assert loadmat(info / f"tracks_{split}_info.mat", mat_dtype=True)[f"track_{split}_info"].dtype == np.float64
        assert table[0, 0] == 1 and table[-1, 1] == len(names)
        assert (table[1:, 0] == table[:-1, 1] + 1).all()  # rows tile the list, 1-based inclusive
        for start, end, pid, cam in table:
            frames = names[start - 1:end]
            assert {f[:7] for f in frames} == {f"{'00-1' if pid == -1 else f'{pid:04d}'}C{cam}T"[:7]}
            assert [int(f[12:15]) for f in frames] == list(range(1, len(frames) + 1))
        if split == "train":
            assert (table[:, 2] % 2 == 1).all()  # train ids odd
        else:
            real = table[table[:, 2] > 0, 2]
            assert (real % 2 == 0).all() and (table[:, 2] == 0).any() and (table[:, 2] == -1).any()
    with Image.open(next((mars_tree / "bbox_train").rglob("*.jpg"))) as im:
        assert im.size == (128, 256) and im.mode == "RGB"
    queries = loadmat(info / "query_IDX.mat")["query_IDX"]
    assert queries.dtype == np.uint16 and queries.shape[0] == 1
    test = loadmat(info / "tracks_test_info.mat")["track_test_info"]
    cams = defaultdict(set)
    for pid, cam in test[:, 2:]:
        if pid > 0:
            cams[pid].add(cam)
    expected = sorted((pid, cam) for pid, c in cams.items() if len(c) > 1 for cam in c)
    assert sorted((test[q - 1, 2], test[q - 1, 3]) for q in queries[0]) == expected  # one query per camera


def test_extreme_lengths_present(tmp_path):
    generate("mars", tmp_path / "m", num_ids=4, seed=3, min_len=2, max_len=900)
    lengths = []
    for split in ("train", "test"):
        table = loadmat(tmp_path / "m" / "info" / f"tracks_{split}_info.mat")[f"track_{split}_info"]
        lengths += (table[:, 1] - table[:, 0] + 1).tolist()
    assert min(lengths) == 2 and max(lengths) == 900


def test_dukev_layout_queries_in_gallery(dukev_tree):
    queries = sorted((dukev_tree / "query").glob("*/*"))
    assert queries
    for q in queries:
        g = dukev_tree / "gallery" / q.parent.name / q.name
        assert sorted(p.name for p in q.iterdir()) == sorted(p.name for p in g.iterdir())
        assert all((q / p.name).read_bytes() == (g / p.name).read_bytes() for p in q.iterdir())
    sizes = set()
    for folder in (dukev_tree / "train").glob("*/*"):
        names = sorted(p.name for p in folder.iterdir())
        m = [re.fullmatch(r"(\d{4})_C([1-8])_F(\d{4})_X(\d+)\.jpg", n) for n in names]
        assert all(m) and {x.group(1) for x in m} == {folder.parent.name} and len({x.group(2) for x in m}) == 1
        assert [int(x.group(3)) for x in m] == list(range(1, len(m) + 1))
        with Image.open(folder / names[0]) as im:
            sizes.add(im.size)
    assert len(sizes) > 1  # crops come in many sizes
    query_pids = {q.parent.name for q in queries}
    gallery_pids = {p.name for p in (dukev_tree / "gallery").iterdir()}
    assert query_pids < gallery_pids  # the gallery also holds distractor identities


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate("mars", tmp_path / "x", num_ids=4, seed=0)

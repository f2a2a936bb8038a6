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


# ----------------------------------------------------------------------------------------------------------
# Workers, exact split sizes, DukeV quirks, reruns and interrupted runs
# ----------------------------------------------------------------------------------------------------------

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from prepare.cli import main as prepare_main
from prepare.synthetic import make_plan
from prepare.synthetic_sizes import MARS_REAL, REAL, SplitSizes, scaled
from tests.test_lock import holder

REPO = Path(__file__).resolve().parents[1]
SMALL_MARS = SplitSizes(train_ids=4, train_tracklets=10, train_frames=300, test_ids=4, test_tracklets=16,
                        test_frames=400, queries=7, distractors=3, junk=2, single_camera_ids=1, min_len=2, max_len=80)
SMALL_DUKEV = SplitSizes(train_ids=3, train_tracklets=7, train_frames=200, test_ids=3, test_tracklets=9,
                         test_frames=300, queries=3, distractors=2, junk=0, single_camera_ids=0, min_len=2, max_len=80)
DUKEV_NAME = re.compile(r"(\d{4})_C(\d)_F(\d{4})_X(\d+)\.jpg")
DUKEV_OLD_NAME = re.compile(r"(\d{4})C(\d)F(\d{4})X(\d+)\.jpg")


def test_workers_give_the_same_bytes(tmp_path, mars_tree):
    """Identities spread over 2 processes: every file (frames, name lists, .mat, DukeV folders) is the same."""
    generate("mars", tmp_path / "m2", num_ids=8, seed=1, min_len=2, max_len=30, workers=2)
    assert tree_digest(tmp_path / "m2") == tree_digest(mars_tree)
    for name, workers in (("d1", 1), ("d2", 2)):
        generate("dukev", tmp_path / name, num_ids=8, seed=1, min_len=2, max_len=30, workers=workers,
                 quirk_f0002=0.3, quirk_old_names=0.3)
    assert tree_digest(tmp_path / "d1") == tree_digest(tmp_path / "d2")
    for name, workers in (("s1", 1), ("s2", 2)):
        generate("mars", tmp_path / name, sizes=SMALL_MARS, seed=4, workers=workers)
    assert tree_digest(tmp_path / "s1") == tree_digest(tmp_path / "s2")


def test_real_sizes_plan_has_the_real_counts():
    """The MARS and DukeV presets plan exactly the distributed datasets' numbers (planning only, no pixels)."""
    plan, _ = make_plan("mars", None, 0, None, None, MARS_REAL)
    assert (len({t.pid for t in plan.train}), len(plan.train), sum(t.length for t in plan.train)) == (625, 8298, 509914)
    test_pids = {t.pid for t in plan.test}
    assert len(test_pids - {0, -1}) == 634 and {0, -1} <= test_pids
    assert (len(plan.test), sum(t.length for t in plan.test), len(plan.queries)) == (12180, 681089, 1980)
    assert sum(t.pid == 0 for t in plan.test) == 3248 and sum(t.pid == -1 for t in plan.test) == 870
    lengths = np.array([t.length for t in plan.tracks])
    assert lengths.min() == 2 and lengths.max() == 920
    assert 30 <= np.median(lengths) <= 38 and 150 <= np.percentile(lengths, 95) <= 210  # MARS: ~33 and ~180
    # One query per camera of each multi-camera test id, as in the real query_IDX
    cams: dict[int, set] = defaultdict(set)
    for t in plan.test:
        if t.pid > 0:
            cams[t.pid].add(t.camid)
    queried = sorted((plan.test[q - 1].pid, plan.test[q - 1].camid) for q in plan.queries)
    assert queried == sorted((p, c) for p, cs in cams.items() if len(cs) > 1 for c in cs)
    assert sum(len(cs) > 1 for cs in cams.values()) == 626

    duke, _ = make_plan("dukev", None, 0, None, None, REAL["dukev"])
    assert (len({t.pid for t in duke.train}), len(duke.train), sum(t.length for t in duke.train)) == (702, 2196, 369656)
    assert (len({t.pid for t in duke.test}), len(duke.test), sum(t.length for t in duke.test)) == (1110, 2636, 445764)
    queries = [t for t in duke.test if t.folders[0].startswith("query/")]
    assert len(queries) == len({t.pid for t in queries}) == 702
    assert not {t.pid for t in duke.train} & {t.pid for t in duke.test}


def test_sized_tree_is_read_by_prepare(tmp_path):
    """A tree with exact small sizes holds those counts in its info files and the MARS reader accepts it."""
    from prepare.dukev import scan_dukev
    from prepare.mars import scan_mars

    root = tmp_path / "m"
    counts = generate("mars", root, sizes=SMALL_MARS, seed=4)
    assert [counts[k] for k in ("frames", "train_tracklets", "test_tracklets", "queries")] == [700, 10, 16, 7]
    train = loadmat(root / "info" / "tracks_train_info.mat")["track_train_info"]
    test = loadmat(root / "info" / "tracks_test_info.mat")["track_test_info"]
    assert (len(set(train[:, 2])), len(train), train[-1, 1]) == (4, 10, 300)
    assert (len(set(test[:, 2]) - {0, -1}), len(test), test[-1, 1]) == (4, 16, 400)
    assert ((test[:, 2] == 0).sum(), (test[:, 2] == -1).sum()) == (3, 2)
    assert loadmat(root / "info" / "query_IDX.mat")["query_IDX"].shape == (1, 7)
    lengths = np.concatenate([train[:, 1] - train[:, 0] + 1, test[:, 1] - test[:, 0] + 1])
    assert lengths.min() == 2 and lengths.max() == 80
    tracklets, skipped = scan_mars(str(root), str(root / "info"))
    assert len(tracklets) == 26 and not skipped
    duke = tmp_path / "d"
    generate("dukev", duke, sizes=SMALL_DUKEV, seed=4)
    tracklets, skipped = scan_dukev(str(duke))
    assert not skipped
    groups = defaultdict(list)
    for t in tracklets:
        groups[t.group].append(t)
    assert (len(groups["train"]), len(groups["gallery"]), len(groups["query"])) == (7, 9, 3)
    assert sum(len(t.frames) for t in groups["train"]) == 200 and sum(len(t.frames) for t in groups["gallery"]) == 300


@pytest.mark.parametrize("change, message", [
    (dict(train_tracklets=7), "fewer than 2 per identity"),
    (dict(train_frames=50), "cannot be split into 10 tracklets"),
    (dict(test_frames=10**6), "cannot be split into 16 tracklets"),
    (dict(queries=20), "one query per camera"),
    (dict(test_tracklets=8), "raise --test-tracklets"),
    (dict(max_len=1000), "3 digits"),
    (dict(train_ids=1), "at least 2"),
])
def test_impossible_sizes_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        generate("mars", tmp_path / "x", sizes=dataclasses.replace(SMALL_MARS, **change))
    assert not (tmp_path / "x").exists()


def test_cli_sizes_and_errors(tmp_path, capsys):
    """--real-sizes plus per-size options on the command line; an impossible size is one line and exit 2."""
    assert prepare_main(["synthetic", "--layout", "mars", "--out", str(tmp_path / "x"), "--real-sizes",
                         "--train-ids", "700", "--train-tracklets", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--train-tracklets 1,000 is fewer than 2 per identity" in err
    out = tmp_path / "s"
    assert prepare_main(["synthetic", "--layout", "mars", "--out", str(out), "--scale", "0.003", "--test-scale",
                         "0.002", "--seed", "3", "--workers", "2"]) == 0
    expected = scaled("mars", MARS_REAL, 0.003, 0.002)
    stamp = json.loads((out / "synthetic.json").read_text())
    assert stamp["options"]["sizes"] == dataclasses.asdict(expected)
    assert stamp["counts"]["frames"] == expected.train_frames + expected.test_frames
    assert "KB/frame" in capsys.readouterr().out


def test_dukev_quirks_as_distributed(tmp_path):
    """Some tracklets start at F0002, some use the older 0001C6F0099X30823.jpg names, query copies included."""
    root = tmp_path / "d"
    generate("dukev", root, num_ids=8, seed=1, min_len=2, max_len=30, quirk_f0002=0.3, quirk_old_names=0.3)
    folders = sorted(p for split in ("train", "gallery") for p in (root / split).glob("*/*"))
    starts, old = [], []
    for folder in folders:
        names = sorted(p.name for p in folder.iterdir())
        new_style = [DUKEV_NAME.fullmatch(n) for n in names]
        old_style = [DUKEV_OLD_NAME.fullmatch(n) for n in names]
        assert all(new_style) or all(old_style), names  # one naming per tracklet
        m = new_style if all(new_style) else old_style
        assert {x.group(1) for x in m} == {folder.parent.name} and len({x.group(2) for x in m}) == 1
        frames = [int(x.group(3)) for x in m]
        assert frames == list(range(frames[0], frames[0] + len(frames))) and frames[0] in (1, 2)  # contiguous
        xs = [int(x.group(4)) for x in m]
        assert xs == list(range(xs[0], xs[0] + len(xs)))
        starts.append(frames[0])
        old.append(all(old_style))
    n = len(folders)
    assert starts.count(2) == round(0.3 * n) and sum(old) == round(0.3 * n)
    for q in (root / "query").glob("*/*"):  # a quirky query tracklet is the same in the gallery
        g = root / "gallery" / q.parent.name / q.name
        assert sorted(p.name for p in q.iterdir()) == sorted(p.name for p in g.iterdir())
    # The quirks change names only: without them the same tracklets hold the same pixels
    plain = tmp_path / "plain"
    generate("dukev", plain, num_ids=8, seed=1, min_len=2, max_len=30)
    for folder in folders:
        twin = plain / folder.relative_to(root)
        by_x = lambda p: int(p.name.rsplit("X", 1)[1][:-len(".jpg")])  # noqa: E731 - the frame order in both styles
        assert [p.read_bytes() for p in sorted(folder.iterdir(), key=by_x)] == \
            [p.read_bytes() for p in sorted(twin.iterdir(), key=by_x)]
    with pytest.raises(ValueError, match="needs --layout dukev"):
        generate("mars", tmp_path / "m", num_ids=8, quirk_old_names=0.1)


def test_rerun_is_a_no_op_and_other_options_are_refused(tmp_path, capsys):
    args = ["synthetic", "--layout", "dukev", "--out", str(tmp_path / "d"), "--ids", "4", "--max-len", "10"]
    assert prepare_main(args) == 0
    before = tree_digest(tmp_path / "d")
    capsys.readouterr()
    assert prepare_main(args) == 0
    assert "is up to date" in capsys.readouterr().out
    assert prepare_main(args[:-1] + ["11"]) == 2
    assert "made with other options (max_len)" in capsys.readouterr().err
    assert tree_digest(tmp_path / "d") == before
    (tmp_path / "empty").mkdir()  # an existing empty folder is filled (replaced by the finished tree)
    generate("dukev", tmp_path / "empty", num_ids=4, max_len=10)
    assert tree_digest(tmp_path / "empty") == before


def test_leftovers_of_a_dead_run_are_cleared_and_a_live_run_is_refused(tmp_path, mars_tree, capsys):
    out = tmp_path / "MARS"
    partial = tmp_path / ".MARS.synthetic-partial"
    (partial / "bbox_train" / "0999").mkdir(parents=True)
    (partial / "bbox_train" / "0999" / "0999C1T0001F001.jpg").write_bytes(b"from a killed run")
    live = holder(partial)  # a live process holds the partial folder's lock
    try:
        with pytest.raises(FileExistsError, match=rf"another synthetic run is writing it: .*pid {live.pid} on"):
            generate("mars", out, num_ids=8, seed=1, min_len=2, max_len=30)
    finally:
        live.stdin.close()  # it exits without releasing: its lock stays behind, stale, as after a SIGKILL
        live.wait()
    assert (partial / "bbox_train" / "0999").exists() and not out.exists()  # a live run's files stay untouched
    generate("mars", out, num_ids=8, seed=1, min_len=2, max_len=30)
    err = capsys.readouterr().err
    assert f"took over the stale lock of holder (pid {live.pid}" in err
    assert "partial output of an interrupted run" in err
    assert tree_digest(out) == tree_digest(mars_tree) and not partial.exists()


def test_an_error_mid_run_leaves_nothing(tmp_path, monkeypatch):
    import prepare.synthetic as synthetic

    calls = []

    def full_disk(frame):
        calls.append(1)
        if len(calls) > 50:
            raise OSError(28, "No space left on device")
        return synthetic_encode(frame)

    synthetic_encode = synthetic.encode_jpeg
    monkeypatch.setattr(synthetic, "encode_jpeg", full_disk)
    with pytest.raises(OSError, match="No space left"):
        generate("mars", tmp_path / "m", num_ids=8, seed=1, min_len=2, max_len=30)
    assert sorted(os.listdir(tmp_path)) == []


def test_killed_run_leaves_no_dataset_and_its_workers_die(tmp_path, mars_tree):
    """SIGKILL mid-run: --out stays absent, no worker keeps writing, the next run starts clean."""
    out = tmp_path / "MARS"
    partial = tmp_path / ".MARS.synthetic-partial"
    cmd = [sys.executable, "-m", "prepare", "synthetic", "--layout", "mars", "--out", str(out), "--ids", "40",
           "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (partial / "bbox_train").exists() or not list((partial / "bbox_train").glob("*/*.jpg")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    count = lambda: sum(len(files) for _, _, files in os.walk(partial))  # noqa: E731
    written = count()
    time.sleep(1.0)
    assert count() == written  # the workers died with their parent
    assert not out.exists()  # never half a dataset under the final name
    assert json.loads((partial / ".lock").read_text())["pid"] == proc.pid  # the killed run's lock, now stale
    generate("mars", out, num_ids=8, seed=1, min_len=2, max_len=30)
    assert tree_digest(out) == tree_digest(mars_tree)  # nothing of the killed 40-id run mixed in

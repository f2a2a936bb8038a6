"""The iLIDS-VID, PRID-2011 and LS-VID readers against hand-built trees with known answers: split membership (our
split N = torchreid's split_id N), cameras, frame order (by frame number, not by name or directory order), and the
LS-VID queries; inspect --split lists them."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from prepare.cli import main as prepare_main
from prepare.verify import verify
from tests.video_trees import (ILIDS_LENGTHS, ILIDS_LS_SET, ILIDS_PERSONS, LSVID_QUERIES, LSVID_ROWS, ilidsvid_tree,
                               lsvid_tree, prid_tree)


def prepare(*args) -> int:
    return prepare_main([str(a) for a in args])


def inspect_json(out, split, capsys) -> dict:
    capsys.readouterr()
    assert prepare("inspect", out, "--json", "--split", split) == 0
    return json.loads(capsys.readouterr().out)


def shard(dataset: str, root, out) -> dict:
    """Prepare `root` into `out`, check it deeply, return its manifest."""
    assert prepare(dataset, "--data-dir", root, "--out", out, "--workers", 1) == 0
    assert verify(out, deep=True) == []
    return json.loads((out / "manifest.json").read_text())


def listed(summary: dict, name: str) -> dict:
    return {t["key"]: t for t in summary["splits"][name]["tracklet_list"]}


def test_ilidsvid_splits_follow_torchreid(tmp_path, capsys):
    out = tmp_path / "shards"
    manifest = shard("ilidsvid", ilidsvid_tree(tmp_path / "ilids"), out)
    assert manifest["version"] == 3 and manifest["dataset"] == "ilidsvid"
    names = [f"person{p:03d}" for p in ILIDS_PERSONS]  # name-sorted: what ls_set's 1-based positions count
    for n, row in enumerate(ILIDS_LS_SET.tolist()):
        # torchreid (ilidsvid.py): test = ls_set[i, :n/2], train = ls_set[i, n/2:], positions into sorted folders
        test = sorted(int(names[p - 1][-3:]) for p in row[:2])
        train = sorted(int(names[p - 1][-3:]) for p in row[2:])
        assert manifest["person_splits"][n] == {"train": train, "test": test}
    summary = inspect_json(out, 0, capsys)
    # split 0 = ls_set row [4, 1, 2, 3]: test persons 13 and 2, train persons 5 and 9 (both cameras)
    train, query, gallery = (listed(summary, s) for s in ("train", "query", "gallery"))
    assert set(train) == {"person005_C1", "person005_C2", "person009_C1", "person009_C2"}
    assert set(query) == {"person002_C1", "person013_C1"} and set(gallery) == {"person002_C2", "person013_C2"}
    assert {t["label"] for t in train.values()} == {0, 1}  # the split's own classes
    assert all(t["camid"] == 1 for t in query.values()) and all(t["camid"] == 2 for t in gallery.values())
    # frames in frame-number order (written in shuffled order), all of the sequence
    frames = query["person013_C1"]["frames"]
    start = 300 + 17 * 13 + 1
    assert frames == [f"cam1_person013_{start + i:05d}.png" for i in range(ILIDS_LENGTHS[(13, 1)])]
    assert query["person013_C1"]["source"] == "i-LIDS-VID/sequences/cam1/person013"


def test_ilidsvid_reads_a_v73_split_file_and_checks_torchreids_splits_json(tmp_path, capsys):
    root = ilidsvid_tree(tmp_path / "ilids")
    mat = root / "train-test people splits" / "train_test_splits_ilidsvid.mat"
    with h5py.File(mat, "w") as f:  # MATLAB v7.3: HDF5 holds the 10 x 4 matrix transposed
        f["ls_set"] = ILIDS_LS_SET.T.astype(np.float64)
    (root / "splits.json").write_text(json.dumps([{"train": ["person002"], "test": ["person005"]}] * 10))
    out = tmp_path / "shards"
    assert prepare("ilidsvid", "--data-dir", root, "--out", out, "--workers", 1) == 0
    assert "splits.json does not match ls_set" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["person_splits"][0] == {"train": [5, 9], "test": [2, 13]}


def test_prid2011_with_torchreids_split_file(tmp_path, capsys):
    lengths = {(p, c): 27 + p for p in (1, 2, 3, 4) for c in (1, 2)}
    lengths[(201, 1)] = 30  # single-view persons above 200 are other people in each camera: never used
    lengths[(201, 2)] = 30
    splits = [{"train": ["person_0001", "person_0003"], "test": ["person_0002", "person_0004"]}] * 5 + \
             [{"train": ["person_0002", "person_0004"], "test": ["person_0001", "person_0003"]}] * 5
    root = prid_tree(tmp_path / "prid2011", lengths, splits)
    out = tmp_path / "shards"
    assert prepare("prid2011", "--data-dir", root, "--out", out, "--workers", 1) == 0
    assert "warning" not in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["person_splits"][0] == {"train": [1, 3], "test": [2, 4]}
    assert manifest["person_splits"][9] == {"train": [2, 4], "test": [1, 3]}
    assert "torchreid" in manifest["person_splits_source"]
    assert {e["pid"] for e in manifest["splits"]["train"]["tracklets"]} == {1, 2, 3, 4}  # not 201
    summary = inspect_json(out, 9, capsys)
    query = listed(summary, "query")
    assert set(query) == {"person_0001_A", "person_0003_A"}
    assert query["person_0003_A"]["frames"] == [f"{i:04d}.png" for i in range(1, 31)]
    assert set(listed(summary, "gallery")) == {"person_0001_B", "person_0003_B"}


def test_prid2011_without_splits_keeps_persons_with_27_frames_in_both_cameras(tmp_path, capsys):
    lengths = {(p, c): 40 for p in range(1, 9) for c in (1, 2)}
    lengths[(3, 2)] = 26  # one frame short in cam_b: out
    lengths[(5, 1)] = 27  # exactly 27: in
    root = prid_tree(tmp_path / "prid2011", lengths)
    out = tmp_path / "shards"
    assert prepare("prid2011", "--data-dir", root, "--out", out, "--workers", 1) == 0
    err = capsys.readouterr().err
    assert "NOT the published splits" in err and "7 persons with >= 27 frames" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert "not the published splits" in manifest["person_splits_source"]
    for split in manifest["person_splits"]:
        assert sorted(split["train"] + split["test"]) == [1, 2, 4, 5, 6, 7, 8] and len(split["test"]) == 3


def test_lsvid_lists_queries_cameras_and_frame_order(tmp_path, capsys):
    out = tmp_path / "shards"
    manifest = shard("lsvid", lsvid_tree(tmp_path / "lsvid"), out)
    gallery = {e["key"]: e for e in manifest["splits"]["gallery"]["tracklets"]}
    assert list(gallery) == [f"test{r:05d}" for r in range(1, 7)]  # every test line, in list order
    assert [e["key"] for e in manifest["splits"]["query"]["tracklets"]] == [f"test{r:05d}" for r in LSVID_QUERIES]
    assert [e["camid"] for e in gallery.values()] == [cam for _, _, cam, _ in LSVID_ROWS["test"]]
    assert gallery["test00006"]["pid"] == -1 and gallery["test00006"]["junk"]
    assert [e["query"] for e in gallery.values()] == [r in LSVID_QUERIES for r in range(1, 7)]
    assert {e["key"] for e in manifest["splits"]["val"]["tracklets"]} == {f"val{r:05d}" for r in range(1, 5)}
    capsys.readouterr()
    assert prepare("inspect", out, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["ids"] == 2 and summary["splits"]["gallery"]["junk"] == 1
    # frames by frame number: 8, 9, 10, 11 (name order would put 10 and 11 first)
    val = inspect_json(out, "val", capsys)
    assert set(val["splits"]) == {"val"}
    test_meta = _member(out, manifest, "gallery", "test00001")
    assert test_meta["frames"] == [f"0010_0001_04_{n}.jpg" for n in (8, 9, 10, 11)]
    assert test_meta["source"] == "tracklet_test/0010"


def _member(out, manifest, split, key) -> dict:
    from prepare.summary import _listed

    entry = next(e for e in manifest["splits"][split]["tracklets"] if e["key"] == key)
    return _listed(out, manifest, [entry])[0]


def test_lsvid_reads_tf_clips_info_folder(tmp_path):
    root = lsvid_tree(tmp_path / "lsvid")
    (root / "info").mkdir()
    (root / "list_sequence").rename(root / "info" / "list_sequence")
    (root / "info" / "data").mkdir()
    (root / "test" / "data" / "info_test.mat").rename(root / "info" / "data" / "info_test.mat")
    assert prepare("lsvid", "--data-dir", root, "--out", tmp_path / "shards", "--workers", 1) == 0


def test_the_same_command_on_a_finished_dataset_is_a_no_op_and_changed_splits_are_refused(tmp_path, capsys):
    lengths = {(p, c): 30 for p in (1, 2, 3, 4) for c in (1, 2)}
    splits = [{"train": ["person_0001", "person_0003"], "test": ["person_0002", "person_0004"]}] * 10
    root = prid_tree(tmp_path / "prid2011", lengths, splits)
    out = tmp_path / "shards"
    assert prepare("prid2011", "--data-dir", root, "--out", out, "--workers", 1) == 0
    before = (out / "manifest.json").read_bytes()
    assert prepare("prid2011", "--data-dir", root, "--out", out, "--workers", 1) == 0
    assert "up to date" in capsys.readouterr().err
    swapped = [{"train": s["test"], "test": s["train"]} for s in splits]
    (root / "splits_prid2011.json").write_text(json.dumps(swapped))
    assert prepare("prid2011", "--data-dir", root, "--out", out, "--workers", 1) == 2
    assert "person_splits" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("dataset", ["mars", "dukev"])
def test_mars_and_dukev_stay_format_version_2(dataset, mars_tree, dukev_tree, tmp_path):
    tree = mars_tree if dataset == "mars" else dukev_tree
    out = tmp_path / "shards"
    assert prepare(dataset, "--data-dir", tree, "--out", out, "--workers", 1) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 2 and "person_splits" not in manifest
    assert all(n.endswith(".jpg") for line in (out / manifest["shards"][0]["index"]).read_text().splitlines()[1:]
               for n in line.split()[3::4][1:])


def test_inspect_into_a_closed_pipe_ends_quietly(tmp_path):
    """`python -m prepare inspect DIR | head -1`: the reader stops early; no 'Broken pipe' error line."""
    import subprocess
    import sys

    raw, shards = tmp_path / "raw", tmp_path / "shards"
    run = [sys.executable, "-m", "prepare"]
    subprocess.run(run + ["synthetic", "--layout", "ilidsvid", "--out", str(raw), "--ids", "40"], check=True,
                   capture_output=True)
    subprocess.run(run + ["ilidsvid", "--data-dir", str(raw), "--out", str(shards)], check=True, capture_output=True)
    inspect = subprocess.Popen(run + ["inspect", str(shards), "--split", "0", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    inspect.stdout.readline()
    inspect.stdout.close()  # as `head -1` does
    assert inspect.wait(timeout=60) == 0
    assert inspect.stderr.read() == b""

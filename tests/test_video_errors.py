"""Bad iLIDS-VID, PRID-2011 and LS-VID input, and a --split that does not fit, end in one line and exit code 2,
with nothing written: no manifest, no shard, no temporary file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prepare.cli import main as prepare_main
from prepare.matfile import mat_bytes
from tests.video_trees import ILIDS_LS_SET, ilidsvid_tree, lsvid_tree, prid_tree

REPO = Path(__file__).resolve().parents[1]
ILIDS_MAT = Path("train-test people splits") / "train_test_splits_ilidsvid.mat"
LSVID_FOLDER = Path("tracklet_train") / "0004"
PRID_LENGTHS = {(p, c): 30 for p in (1, 2, 3, 4) for c in (1, 2)}
PRID_SPLITS = [{"train": ["person_0001", "person_0003"], "test": ["person_0002", "person_0004"]}] * 10


def _empty(folder: Path):
    for f in folder.iterdir():
        f.unlink()


CASES = {  # dataset, damage, what the line must say
    "missing ls_set file": ("ilidsvid", lambda r: (r / ILIDS_MAT).unlink(), ["train_test_splits_ilidsvid.mat",
                                                                              "not found"]),
    "ls_set of the wrong shape": ("ilidsvid", lambda r: (r / ILIDS_MAT).write_bytes(
        mat_bytes("ls_set", ILIDS_LS_SET[:, :3].copy())), ["ls_set is 10 x 3", "expected 10 x 4"]),
    "ls_set of wrong values": ("ilidsvid", lambda r: (r / ILIDS_MAT).write_bytes(
        mat_bytes("ls_set", np.where(ILIDS_LS_SET == 4, 5, ILIDS_LS_SET).astype(np.int32))),
        ["ls_set row 1", "permutation of 1..4"]),
    "a person in one camera only": ("ilidsvid", lambda r: shutil.rmtree(
        r / "i-LIDS-VID" / "sequences" / "cam2" / "person009"), ["person009", "no sequence in cam2"]),
    "an empty iLIDS person folder": ("ilidsvid", lambda r: _empty(r / "i-LIDS-VID" / "sequences" / "cam1" /
                                                                  "person005"), ["person005", "no PNG frames"]),
    "an empty PRID person folder": ("prid2011", lambda r: _empty(r / "prid_2011" / "multi_shot" / "cam_b" /
                                                                 "person_0002"), ["person_0002", "no PNG frames"]),
    "a missing --splits file": ("prid2011", lambda r: (r / "splits_prid2011.json").rename(r / "elsewhere.json"),
                                ["nowhere.json", "split file not found"]),
    "a split file naming an unknown person": ("prid2011", lambda r: (r / "splits_prid2011.json").write_text(
        '[{"train": ["person_0009"], "test": ["person_0001"]}' + ', {"train": ["person_0002"], "test": ["person_0001"]}'
        * 9 + "]"), ["person_0009", "not a person seen by both cameras"]),
    "an LS-VID line naming no frames": ("lsvid", lambda r: (r / "list_sequence" / "list_seq_val.txt").write_text(
        "tracklet_val/0006/0006_0009_01_ 6\n"), ["list_seq_val.txt:1", "names no frames"]),
    "info_test.mat that is not HDF5": ("lsvid", lambda r: (r / "test" / "data" / "info_test.mat").write_bytes(
        mat_bytes("query", np.array([[1, 4]], dtype=np.int32))), ["info_test.mat", "not an HDF5 file"]),
    "an LS-VID query row past the list": ("lsvid", lambda r: _write_queries(r, [1, 99]), ["info_test.mat",
                                                                                          "1..6"]),
    "an LS-VID frame name without a frame number": ("lsvid", lambda r: (r / LSVID_FOLDER / "0004_0001_02_1.jpg").rename(
        r / LSVID_FOLDER / "0004_0001_02_a.jpg"), ["0004_0001_02_a.jpg", "frame number last"]),
}


def _write_queries(root: Path, rows):
    from prepare.synthetic_layouts import write_info_test

    write_info_test(root / "test" / "data" / "info_test.mat", rows)


def build(dataset: str, root: Path) -> Path:
    if dataset == "ilidsvid":
        return ilidsvid_tree(root)
    if dataset == "prid2011":
        return prid_tree(root, PRID_LENGTHS, PRID_SPLITS)
    return lsvid_tree(root)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_nothing_is_written(case, tmp_path, capsys):
    dataset, damage, fragments = CASES[case]
    root = build(dataset, tmp_path / "data")
    damage(root)
    out = tmp_path / "out"
    extra = ["--splits", root / "nowhere.json"] if case == "a missing --splits file" else []
    code = prepare_main([dataset, "--data-dir", str(root), "--out", str(out), "--workers", "1", *map(str, extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("prepare: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not out.exists() or not any(p for p in out.rglob("*") if p.is_file() and p.name != ".lock")


@pytest.fixture(scope="module")
def ilids_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ilids")
    root = ilidsvid_tree(tmp / "data")
    assert prepare_main(["ilidsvid", "--data-dir", str(root), "--out", str(tmp / "shards"), "--workers", "1"]) == 0
    return tmp / "shards"


@pytest.fixture(scope="module")
def mars_shards(mars_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("mars") / "shards"
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(out), "--workers", "1"]) == 0
    return out


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("split, which, says", [
    ("10", "ilids", "numbered 0..9"),
    (None, "ilids", "pass --split N"),
    ("3", "mars", "MARS has no person splits"),
    ("val", "ilids", "iLIDS-VID has no val split"),
])
def test_a_split_that_does_not_fit_is_one_line(split, which, says, ilids_shards, mars_shards, tmp_path):
    data = ilids_shards if which == "ilids" else mars_shards
    with_split = [] if split is None else ["--split", split]
    train = run("train.py", "--data", data, "--out", tmp_path / "run", "--pretrained", "none", *with_split)
    evaluate = run("eval.py", "--checkpoint", tmp_path / "none.pt", "--data", data, *with_split)
    for result, prefix in ((train, "train: error:"), (evaluate, "eval: error:")):
        if result is train and split == "val":
            continue  # train.py's split is a number: 'val' is refused as one (below)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(prefix), result.stderr
        assert says in lines[0], lines[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.pt"))
    if split is not None:
        inspect = run("-m", "prepare", "inspect", data, "--split", split)
        assert inspect.returncode == 2 and says in inspect.stderr and inspect.stderr.count("\n") == 1, inspect.stderr


def test_train_refuses_split_val_as_not_a_number(ilids_shards, tmp_path):
    result = run("train.py", "--data", ilids_shards, "--out", tmp_path / "run", "--split", "val")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "split='val'" in result.stderr

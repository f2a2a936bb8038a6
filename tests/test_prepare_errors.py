"""Bad input gets one clear error naming the file, a non-zero exit and no shards; --skip-bad skips instead."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.io import savemat

from prepare.cli import main as prepare_main
from prepare.matfile import mat_bytes


def prepare_mars(tree, out):
    return prepare_main(["mars", "--data-dir", str(tree), "--info-dir", str(tree / "info"), "--out", str(out),
                         "--workers", "1"])


def names(tree, split="train"):
    return (tree / "info" / f"{split}_name.txt").read_text().split()


def frame_path(tree, index=3, split="train"):
    n = names(tree, split)[index]
    return tree / f"bbox_{split}" / n[:4] / n


def expect_error(capsys, code, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("prepare: error:")]
    assert code != 0 and len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def damage_info(tree, fname, variable, values):
    (tree / "info" / fname).write_bytes(mat_bytes(variable, values))


MARS_CASES = {
    "missing bbox_train folder": (lambda t: shutil.rmtree(t / "bbox_train"), ["bbox_train", "not found"]),
    "missing info file": (lambda t: (t / "info" / "query_IDX.mat").unlink(), ["query_IDX.mat", "not found"]),
    "wrong variable name": (lambda t: damage_info(t, "query_IDX.mat", "queries", np.array([[1]], np.uint16)),
                            ["query_IDX.mat", "'query_IDX' not found"]),
    "float storage": (lambda t: savemat(t / "info" / "tracks_train_info.mat",
                                        {"track_train_info": np.array([[1.0, 2.0, 1.0, 1.0]])}),
                      ["tracks_train_info.mat", "float64", "integers"]),
    "rows outside the name list": (lambda t: damage_info(t, "tracks_train_info.mat", "track_train_info",
                                                         np.array([[1, 10**6, 1, 1]], np.int32)),
                                   ["tracks_train_info.mat", "row 1"]),
    "rows not contiguous": (lambda t: damage_info(t, "tracks_train_info.mat", "track_train_info",
                                                  np.array([[1, 2, 1, 1], [4, len(names(t)), 1, 1]], np.int32)),
                            ["tracks_train_info.mat", "row 2", "contiguously"]),
    "listed frame missing": (lambda t: frame_path(t).unlink(), ["does not exist"]),
    "zero-byte frame": (lambda t: frame_path(t).write_bytes(b""), ["zero-byte"]),
    "truncated frame": (lambda t: frame_path(t).write_bytes(frame_path(t).read_bytes()[:-100]), ["truncated"]),
    "non-JPEG frame": (lambda t: frame_path(t).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)), ["not a JPEG"]),
    "frames disagree on camera": (lambda t: (t / "info" / "train_name.txt").write_bytes(
        "".join(n[:5] + ("9" if i == 3 else n[5]) + n[6:] + "\r\n" for i, n in enumerate(names(t))).encode()),
        ["bbox_train", "info row 2", "agree"]),
    "non-numeric identity folder": (lambda t: (t / "bbox_train" / "abcd").mkdir(), ["abcd", "4-digit"]),
}


@pytest.mark.parametrize("case", list(MARS_CASES))
def test_bad_mars_input_is_one_clear_error(case, mars_tree, copy_tree, tmp_path, capsys):
    tree = copy_tree(mars_tree)
    damage, fragments = MARS_CASES[case]
    damage(tree)
    out = tmp_path / "out"
    code = prepare_mars(tree, out)
    line = expect_error(capsys, code, *fragments)
    assert code == 2
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tar")) and not list(out.glob(".*.tmp"))
    if case in ("zero-byte frame", "truncated frame", "non-JPEG frame", "listed frame missing"):
        assert str(frame_path(tree)) in line  # the full path of the broken file


@pytest.mark.parametrize("case", ["zero-byte frame", "truncated frame", "non-JPEG frame", "listed frame missing",
                                  "frames disagree on camera"])
def test_skip_bad_skips_and_lists_the_tracklet(case, mars_tree, copy_tree, tmp_path, capsys):
    tree = copy_tree(mars_tree)
    damaged = frame_path(tree).name
    MARS_CASES[case][0](tree)
    out = tmp_path / "out"
    clean = tmp_path / "clean"
    assert prepare_mars(mars_tree, clean) == 0
    code = prepare_main(["mars", "--data-dir", str(tree), "--out", str(out), "--workers", "1", "--skip-bad"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reference = json.loads((clean / "manifest.json").read_text())
    assert len(manifest["skipped"]) == 1
    assert manifest["skipped"][0]["key"] == damaged[:11]
    assert manifest["splits"]["train"]["num_tracklets"] == reference["splits"]["train"]["num_tracklets"] - 1
    assert "skipped " + damaged[:11] in capsys.readouterr().err


def test_dukev_errors(dukev_tree, copy_tree, tmp_path, capsys):
    def run(tree):
        return prepare_main(["dukev", "--data-dir", str(tree), "--out", str(tmp_path / "out"), "--workers", "1"])

    tree = copy_tree(dukev_tree, "gaps")
    folder = sorted((tree / "train").glob("*/*"), key=lambda f: -len(list(f.iterdir())))[0]
    second = sorted(folder.iterdir())[1]
    second.unlink()  # F0002 missing: a gap
    expect_error(capsys, run(tree), str(folder), "gaps")

    tree = copy_tree(dukev_tree, "camera")
    folder = sorted((tree / "train").glob("*/*"), key=lambda f: -len(list(f.iterdir())))[0]
    first = sorted(folder.iterdir())[0]
    cam = first.name.split("_")[1]
    first.rename(folder / first.name.replace(cam, "C9" if cam != "C9" else "C8"))
    expect_error(capsys, run(tree), str(folder), "cameras")

    tree = copy_tree(dukev_tree, "identity")
    (tree / "query" / "x12").mkdir()
    expect_error(capsys, run(tree), "x12", "numbers")

    tree = copy_tree(dukev_tree, "missing")
    shutil.rmtree(tree / "gallery")
    expect_error(capsys, run(tree), "gallery", "not found")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_output_holding_another_dataset_is_refused(mars_tree, dukev_tree, tmp_path, capsys):
    assert prepare_mars(mars_tree, tmp_path / "s") == 0
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    capsys.readouterr()
    code = prepare_main(["dukev", "--data-dir", str(dukev_tree), "--out", str(tmp_path / "s"), "--workers", "1"])
    expect_error(capsys, code, str(tmp_path / "s"), "'mars'", "not 'dukev'")
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before


def test_missing_data_dir(tmp_path, capsys):
    code = prepare_mars(tmp_path / "nowhere", tmp_path / "out")
    expect_error(capsys, code, "nowhere", "not found")

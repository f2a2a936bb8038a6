"""Bad input gets one clear error naming the file, a non-zero exit and no shards; --skip-bad skips instead."""

from __future__ import annotations

import errno
import json
import os
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
    "non-JPEG frame": (lambda t: frame_path(t).write_bytes(b"GIF89a" + bytes(100)), ["neither a JPEG nor a PNG"]),
    "broken PNG frame": (lambda t: frame_path(t).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)),
                         ["broken PNG"]),
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
    if case in ("zero-byte frame", "truncated frame", "non-JPEG frame", "broken PNG frame", "listed frame missing"):
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


def test_output_that_is_a_file(mars_tree, tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"x")
    code = prepare_mars(mars_tree, tmp_path / "file")
    expect_error(capsys, code, str(tmp_path / "file"), "not a folder")
    assert (tmp_path / "file").read_bytes() == b"x"


def test_read_only_output(mars_tree, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() != 0:
        parent.chmod(0o555)
    else:  # root writes anywhere: make the folder's creation fail as a read-only filesystem does
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if str(path).startswith(str(parent)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_mkdir(path, *args, **kwargs)
        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        code = prepare_mars(mars_tree, parent / "out")
    finally:
        parent.chmod(0o755)
    line = expect_error(capsys, code, str(parent / "out"))
    assert code == 2 and ("read-only" in line or "permission denied" in line), line


def test_full_disk_is_one_line_and_a_rerun_finishes(mars_tree, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of the run (injected at the fifth fsync: run.json, then shard 0, its record and index
    are written; the disk fills while shard 1 is written)."""
    reference = tmp_path / "ref"
    assert prepare_mars(mars_tree, reference) == 0
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    capsys.readouterr()
    code = prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(out), "--workers", "1",
                         "--shard-size", "200KB"])
    line = expect_error(capsys, code, str(out), "No space left on device", "free some space")
    assert code == 2, line
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp")) and not (out / ".lock").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    capsys.readouterr()
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(out), "--workers", "1",
                         "--shard-size", "200KB"]) == 0
    assert "resuming, 1 of" in capsys.readouterr().err
    again = tmp_path / "again"
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(again), "--workers", "1",
                         "--shard-size", "200KB"]) == 0
    assert (out / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()


def test_jpeg_with_bytes_after_its_end_is_accepted_a_cut_one_is_not(mars_tree, copy_tree, tmp_path, capsys):
    tree = copy_tree(mars_tree)
    frame = frame_path(tree)
    data = frame.read_bytes()
    frame.write_bytes(data + b"\x00\x00camera trailer\xff\xd8 bytes after EOI")
    assert prepare_mars(tree, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == [] and manifest["splits"]["train"]["num_frames"] == len(names(tree))
    frame.write_bytes(data[:len(data) // 2] + b"trailer")  # cut short in its image data, then other bytes
    code = prepare_mars(tree, tmp_path / "cut")
    expect_error(capsys, code, str(frame), "truncated")


def test_skip_bad_reports_what_it_left_out(mars_tree, copy_tree, tmp_path, capsys):
    tree = copy_tree(mars_tree)
    frame_path(tree).write_bytes(b"")
    frame_path(tree, index=1, split="test").write_bytes(frame_path(tree, index=1, split="test").read_bytes()[:-50])
    capsys.readouterr()
    assert prepare_main(["mars", "--data-dir", str(tree), "--out", str(tmp_path / "out"), "--workers", "1",
                         "--skip-bad"]) == 0
    err = capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["group"] for s in manifest["skipped"]] == ["train", "test"]
    assert "--skip-bad left out 2 tracklets (train 1, test 1)" in err
    gallery = manifest["splits"]["gallery"]
    assert f"gallery {gallery['num_tracklets']:,} tracklets / {gallery['num_ids']:,} ids" in err

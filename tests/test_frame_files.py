"""Hostile folders of raw frames (stenvan.frame_files, through prepare.tracklet and stenvan.inference.embed): a FIFO or a
symlink to /dev/zero named like a frame, a frame that is a folder, a tracklet or identity folder that is a
dangling symlink (a volume not mounted), folder names in other scripts' digits. Each is one line naming the
entry (or, with --skip-bad, a skip that says so), never a hang, a silently shrunken split or a traceback."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading

import pytest
from prepare_helpers import REPO, error_lines, run_prepare

import embed as embed_cli


def mars_frame(tree, index=3, split="train"):
    name = (tree / "info" / f"{split}_name.txt").read_text().split()[index]
    return tree / f"bbox_{split}" / name[:4] / name


def prepare_subprocess(*args, timeout=120):
    """`python -m prepare ...` with at most 2 GiB of memory and `timeout` seconds: the old code blocked for ever
    on a FIFO and read /dev/zero until memory ran out."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    try:
        return subprocess.run([sys.executable, "-m", "prepare", *map(str, args)], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"prepare {' '.join(map(str, args[:1]))} hung for {timeout} s")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder"])
def test_a_frame_that_is_not_a_regular_file_is_one_line(kind, mars_tree, copy_tree, tmp_path):
    tree = copy_tree(mars_tree)
    frame = mars_frame(tree)
    frame.unlink()
    if kind == "fifo":
        os.mkfifo(frame)
    elif kind == "dev_zero":
        frame.symlink_to("/dev/zero")
    else:
        (tmp_path / "a_folder").mkdir()
        frame.symlink_to(tmp_path / "a_folder")
    what = {"fifo": "a FIFO", "dev_zero": "a character device", "folder": "a folder"}[kind]
    result = prepare_subprocess("mars", "--data-dir", tree, "--out", tmp_path / "out", "--workers", 1)
    errors = error_lines(result.stderr)
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{frame}: is {what}, not a frame file" in errors[0]  # the frame, not a temp file of prepare's
    result = prepare_subprocess("mars", "--data-dir", tree, "--out", tmp_path / "skip", "--workers", 1, "--skip-bad")
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = json.loads((tmp_path / "skip" / "manifest.json").read_text())["skipped"]
    assert len(skipped) == 1 and f"is {what}" in skipped[0]["reason"]


def test_the_writer_reads_a_frame_without_blocking_and_no_more_than_its_size(tmp_path):
    """What the scan saw may change before the writer reads: a FIFO swapped in, a file grown since."""
    from prepare.tracklet import read_frame_file

    fifo, grown = tmp_path / "swapped.jpg", tmp_path / "grown.jpg"
    os.mkfifo(fifo)
    grown.write_bytes(b"\xff\xd8\xff" + bytes(100))
    result = {}
    reader = threading.Thread(target=lambda: result.update(fifo=read_frame_file(str(fifo), 10)), daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():
        with open(fifo, "wb"):  # let the blocked reader go
            pass
        pytest.fail("reading a FIFO named like a frame blocked")
    assert result["fifo"][0] is None and "is a FIFO, not a frame file" in result["fifo"][1]
    data, problem = read_frame_file(str(grown), 50)
    assert data is None and "now 103 bytes, 50 when its folder was listed" in problem


def test_dukev_entries_that_vanished_are_errors_or_listed_skips(dukev_tree, copy_tree, tmp_path, capsys):
    """A tracklet or an identity folder that is a dangling symlink: the old code dropped it, and the split
    counts shrank without a word."""
    tree = copy_tree(dukev_tree)
    tracklet = sorted((tree / "gallery").glob("*/*"))[0]
    identity = sorted((tree / "train").iterdir())[-1]
    for i, folder in enumerate((tracklet, identity)):
        os.rename(folder, tmp_path / f"moved{i}")
        folder.symlink_to(tmp_path / "unmounted" / folder.name)
    capsys.readouterr()
    assert run_prepare("dukev", "--data-dir", tree, "--out", tmp_path / "out", "--workers", 1) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "a symlink to a missing target" in errors[0] and str(identity) in errors[0], errors
    assert run_prepare("dukev", "--data-dir", tree, "--out", tmp_path / "skip", "--workers", 1, "--skip-bad") == 0
    err = capsys.readouterr().err
    skipped = json.loads((tmp_path / "skip" / "manifest.json").read_text())["skipped"]
    reasons = {s["key"]: s["reason"] for s in skipped}
    assert reasons.keys() == {identity.name, f"{tracklet.parent.name}_T{tracklet.name}"}, reasons
    assert all("a symlink to a missing target" in r for r in reasons.values())
    assert f"prepare: skipped {identity.name}: " in err


def test_mars_identity_folder_that_vanished_names_it(mars_tree, copy_tree, tmp_path, capsys):
    tree = copy_tree(mars_tree)
    identity = mars_frame(tree).parent
    os.rename(identity, tmp_path / "moved")
    identity.symlink_to(tmp_path / "unmounted")
    capsys.readouterr()
    assert run_prepare("mars", "--data-dir", tree, "--out", tmp_path / "out", "--workers", 1) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"its folder {identity} is a symlink to a missing target" in errors[0], errors


@pytest.mark.parametrize("level", ["identity", "tracklet"])
def test_folder_names_in_other_scripts_digits_are_named(level, dukev_tree, copy_tree, tmp_path, capsys):
    """'٠٠٠١' (Arabic-Indic digits) passes str.isdigit(); the old code then failed deep in the tar writer with
    "'ascii' codec can't encode...", naming nothing."""
    tree = copy_tree(dukev_tree)
    folder = sorted((tree / "train").iterdir())[0]
    if level == "tracklet":
        folder = sorted(folder.iterdir())[0]
    odd = folder.with_name("\u0660\u0660\u0660\u0661")
    os.rename(folder, odd)
    capsys.readouterr()
    assert run_prepare("dukev", "--data-dir", tree, "--out", tmp_path / "out", "--workers", 1) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"{odd}: {level} folders must be numbers (ASCII digits)" in errors[0], errors


def test_embed_refuses_frames_and_folders_that_are_not_what_they_seem(mars_tree, tmp_path, capsys):
    """embed.py's tracklet folders follow the same rules: the old code dropped a dangling tracklet folder and a
    FIFO or /dev/zero frame without a word."""
    from tiny_checkpoint import tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "model.pt")
    frames = sorted((mars_tree / "bbox_test").glob("*/*.jpg"))[:4]
    root = tmp_path / "tracklets"
    (root / "a").mkdir(parents=True)
    for f in frames:
        (root / "a" / f.name).write_bytes(f.read_bytes())

    def one_line(tracklets) -> str:
        capsys.readouterr()
        assert embed_cli.main(["--checkpoint", str(model), "--tracklets", str(tracklets), "--out",
                               str(tmp_path / f"{tracklets.name}.npz"), "--workers", "0"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    (root / "b").symlink_to(tmp_path / "unmounted")
    assert f"{root / 'b'}: a symlink to a missing target" in one_line(root)
    (root / "b").unlink()
    os.mkfifo(root / "a" / "zz_fifo.jpg")
    assert f"{root / 'a' / 'zz_fifo.jpg'}: is a FIFO, not a frame file" in one_line(root)
    (root / "a" / "zz_fifo.jpg").unlink()
    (root / "a" / "zz_zero.jpg").symlink_to("/dev/zero")
    assert "zz_zero.jpg: is a character device, not a frame file" in one_line(root)

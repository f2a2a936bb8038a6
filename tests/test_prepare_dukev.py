"""DukeV as distributed: tracklets that start after F0001 and the older naming without underscores are read;
a real gap stays an error, or a listed skip with --skip-bad."""

from __future__ import annotations

import json
import re

import pytest
from prepare_helpers import error_lines, run_prepare

from prepare.verify import verify

NEW = re.compile(r"^(\d{4})_C(\d)_F(\d{4})_X(\d+)\.jpg$")


def longest(tree, split):
    return sorted((tree / split).glob("*/*"), key=lambda f: (-len(list(f.iterdir())), str(f)))[0]


def shift_start(folder, by=1):
    """F0001..F000n → F(1+by)..: the tracklet starts later, without a gap."""
    for path in sorted(folder.iterdir(), reverse=True):
        pid, cam, frame, x = NEW.match(path.name).groups()
        path.rename(folder / f"{pid}_C{cam}_F{int(frame) + by:04d}_X{x}.jpg")


def old_naming(folder):
    """0001_C6_F0099_X30823.jpg → 0001C6F0099X30823.jpg."""
    for path in folder.iterdir():
        path.rename(folder / path.name.replace("_", ""))


def prepare_dukev(tree, out, *extra):
    return run_prepare("dukev", "--data-dir", tree, "--out", out, "--workers", 1, *extra)


def test_late_starts_and_the_old_naming_are_read(dukev_tree, copy_tree, tmp_path):
    tree = copy_tree(dukev_tree)
    late, old = longest(tree, "train"), longest(tree, "gallery")
    shift_start(late, by=1)
    old_naming(old)
    query = next(q for q in (tree / "query").glob("*/*"))
    shift_start(query, by=3)
    old_naming(query)
    assert prepare_dukev(tree, tmp_path / "s") == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for split in ("train", "query", "gallery"):
        folders = sorted((tree / split).glob("*/*"))
        assert m["splits"][split]["num_tracklets"] == len(folders)
        assert m["splits"][split]["num_frames"] == sum(len(list(f.iterdir())) for f in folders)
    from stenvan.data.table import TrackletTable

    for folder, split in ((late, "train"), (old, "gallery"), (query, "query")):
        table = TrackletTable.from_dir(tmp_path / "s", split)
        key = f"{folder.parent.name}_C{sorted(folder.iterdir())[0].name.replace('_', '')[5]}_T{folder.name}"
        meta = table.metadata(table.keys.index(key))
        frames = sorted(folder.iterdir(), key=lambda p: int(re.search(r"F(\d{4})", p.name).group(1)))
        assert meta["frames"] == [p.name for p in frames]  # every frame, in frame-index order
        assert meta["num_frames"] == len(frames)
    assert verify(tmp_path / "s", deep=True) == []


@pytest.mark.parametrize("naming", ["new", "old"])
def test_a_gap_inside_a_late_tracklet_is_an_error_or_a_listed_skip(naming, dukev_tree, copy_tree, tmp_path, capsys):
    tree = copy_tree(dukev_tree)
    folder = longest(tree, "train")
    shift_start(folder, by=1)
    if naming == "old":
        old_naming(folder)
    frames = sorted(folder.iterdir())
    frames[2].unlink()  # F0002, F0003, -, F0005...
    capsys.readouterr()
    assert prepare_dukev(tree, tmp_path / "out") == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(folder) in errors[0] and "missing ['F0004']" in errors[0], errors
    assert not (tmp_path / "out" / "manifest.json").exists()

    assert prepare_dukev(tree, tmp_path / "skip", "--skip-bad") == 0
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert [(s["group"], s["key"]) for s in m["skipped"]] == [("train", f"{folder.parent.name}_T{folder.name}")]
    assert m["splits"]["train"]["num_tracklets"] == len(list((tree / "train").glob("*/*"))) - 1
    assert "--skip-bad left out 1 tracklets (train 1)" in err and f"skipped {folder.parent.name}_T{folder.name}" in err


def test_one_frame_under_both_namings_is_a_repeat(dukev_tree, copy_tree, tmp_path, capsys):
    tree = copy_tree(dukev_tree)
    folder = longest(tree, "gallery")
    first = sorted(folder.iterdir())[0]
    (folder / first.name.replace("_", "")).write_bytes(first.read_bytes())
    capsys.readouterr()
    assert prepare_dukev(tree, tmp_path / "out") == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "repeated ['F0001']" in errors[0], errors


def test_the_generators_quirky_dukev_prepares_with_every_tracklet(tmp_path):
    """The synthetic DukeV with both quirks (late starts, old names) prepares with the same counts as without."""
    from prepare.synthetic import generate

    counts = {}
    for quirks in (0.0, 0.4):
        tree = tmp_path / f"raw{quirks}"
        generate("dukev", tree, num_ids=6, seed=3, min_len=2, max_len=12, quirk_f0002=quirks, quirk_old_names=quirks)
        folders = list(tree.glob("*/*/*"))
        first_frame = [min(int(re.search(r"F(\d{4})", p.name).group(1)) for p in f.iterdir()) for f in folders]
        old_names = [any(not NEW.match(p.name) for p in f.iterdir()) for f in folders]
        assert (any(n > 1 for n in first_frame) and any(old_names)) == bool(quirks)  # the quirks are really there
        assert prepare_dukev(tree, tmp_path / f"s{quirks}") == 0
        m = json.loads((tmp_path / f"s{quirks}" / "manifest.json").read_text())
        assert not m.get("skipped")
        counts[quirks] = {s: (m["splits"][s]["num_tracklets"], m["splits"][s]["num_frames"]) for s in m["splits"]}
        assert verify(tmp_path / f"s{quirks}", deep=True) == []
    assert counts[0.4] == counts[0.0]

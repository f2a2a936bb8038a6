"""Rerunning prepare on its own output: a verified no-op, a repair with the recorded bytes, or a clear refusal;
never a half-applied change, never a deleted file that prepare did not write."""

from __future__ import annotations

import json
import os

import pytest
from prepare_helpers import error_lines, run_prepare, shard_mars, snapshot

from prepare.verify import verify
from stenvan.shards import read_index


@pytest.fixture(scope="module")
def finished(mars_tree, module_tmp):
    """A finished dataset of the session's MARS tree (copy it before changing it)."""
    out = module_tmp("finished") / "shards"
    shard_mars(mars_tree, out, "--shard-size", "200KB")
    return out


def rerun(tree, out, *extra):
    return run_prepare("mars", "--data-dir", tree, "--out", out, "--workers", 2, "--shard-size", "200KB", *extra)


def test_rerun_of_a_finished_dataset_is_a_verified_noop(mars_tree, finished, copy_tree, capsys):
    out = copy_tree(finished, "out")
    before = snapshot(out)
    capsys.readouterr()
    assert rerun(mars_tree, out) == 0
    err = capsys.readouterr().err
    assert "up to date" in err and "wrote" not in err
    assert snapshot(out) == before  # not a byte or a file time changed


def test_what_verify_advises_rerun_restores_with_the_recorded_bytes(mars_tree, finished, copy_tree, capsys):
    out = copy_tree(finished, "out")
    before = snapshot(out)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = out / manifest["shards"][1]["name"]
    member = read_index(out / manifest["shards"][1]["index"])[0][1]
    data = bytearray(shard.read_bytes())
    data[member.offset + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / manifest["shards"][2]["index"]).unlink()
    problems = verify(out)
    assert problems and all("rerun" in p for p in problems)
    capsys.readouterr()
    assert rerun(mars_tree, out) == 0
    err = capsys.readouterr().err
    assert "restored 2 damaged shards" in err
    assert verify(out) == []
    assert {k: v[0] for k, v in snapshot(out).items()} == {k: v[0] for k, v in before.items()}


def test_a_damaged_or_edited_manifest_is_restored(mars_tree, finished, copy_tree, capsys):
    out = copy_tree(finished, "out")
    original = (out / "manifest.json").read_bytes()
    edited = json.loads(original)
    edited["dataset"] = "dukev"  # would silently switch the evaluation protocol
    (out / "manifest.json").write_text(json.dumps(edited))
    problems = verify(out)
    assert len(problems) == 1 and "manifest.json" in problems[0] and "edited" in problems[0]
    capsys.readouterr()
    assert rerun(mars_tree, out) == 0
    assert "restored manifest.json" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == original


def _flip_a_frame_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, other content
    path.write_bytes(bytes(data))


def _replace_a_frame(path):
    path.write_bytes(path.read_bytes() + b"\0" * 700)  # a frame of another size


@pytest.mark.parametrize("change, message", [
    (lambda tree, out: ([], _flip_a_frame_byte(next((tree / "bbox_test").glob("*/*F002.jpg")))),
     "the contents of its input frames changed: 1 shards"),
    (lambda tree, out: ([], _replace_a_frame(next((tree / "bbox_train").glob("*/*.jpg")))),
     "its input changed (tracklets, frame names or frame sizes): 1 shards would differ"),
    (lambda tree, out: (["--shard-size", "1MB"], None),
     "it was prepared with --shard-size 200000, this command asks for --shard-size 1000000"),
    (lambda tree, out: (["--skip-bad"], None), "this command asks for --shard-size 200000 --skip-bad"),
], ids=["frame bytes", "frame size", "shard size", "skip-bad"])
def test_changed_input_or_options_are_refused_and_the_dataset_stays(change, message, mars_tree, finished, copy_tree,
                                                                    capsys):
    tree, out = copy_tree(mars_tree, "tree"), copy_tree(finished, "out")
    before = snapshot(out)
    extra, _ = change(tree, out)
    capsys.readouterr()
    code = rerun(tree, out, *extra)
    errors = error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1, errors
    assert message in errors[0] and str(out) in errors[0] and "left as it was" in errors[0]
    assert snapshot(out) == before  # nothing rewritten, not even temporarily
    assert verify(out) == []


def test_same_frames_with_new_file_times_are_checked_not_refused(mars_tree, finished, copy_tree, capsys):
    tree, out = copy_tree(mars_tree, "tree"), copy_tree(finished, "out")
    frame = next((tree / "bbox_train").glob("*/*.jpg"))
    os.utime(frame, ns=(1, 10**18))  # touched: same bytes
    capsys.readouterr()
    assert rerun(tree, out) == 0
    err = capsys.readouterr().err
    assert "checking 1 shards against the input (0 damaged, 1 with changed frame times)" in err and "up to date" in err
    capsys.readouterr()
    assert rerun(tree, out) == 0  # the new times are recorded: now a plain no-op
    assert "checking" not in capsys.readouterr().err


def test_new_frame_times_alone_leave_every_file_in_place(mars_tree, finished, copy_tree, capsys):
    """A copy or rsync without -p gives every frame new times: the rerun checks the bytes and, finding them the
    same, leaves each shard, index and the manifest as they were (same inode and time), so that a job reading
    the dataset goes on; the old code renamed a rewritten copy of each shard into place ("shard replaced")."""
    from stenvan.data import TrackletTable

    tree, out = copy_tree(mars_tree, "tree"), copy_tree(finished, "out")
    for frame in tree.rglob("*.jpg"):
        os.utime(frame, ns=(10**18, 10**18))
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != ".lock")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    tables = [TrackletTable.from_dir(out, split) for split in ("train", "gallery")]  # a training and an eval job
    capsys.readouterr()
    assert rerun(tree, out) == 0
    err = capsys.readouterr().err
    assert "with changed frame times" in err and "up to date" in err, err
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    for table in tables:
        table.check_shards()  # ShardChangedError for a replaced shard
    capsys.readouterr()
    assert rerun(tree, out) == 0  # the new times are recorded: now a plain no-op
    assert "checking" not in capsys.readouterr().err


def test_prepare_never_deletes_files_it_did_not_write(mars_tree, tmp_path, capsys):
    out = tmp_path / "out"
    shard_mars(mars_tree, out, "--shard-size", "200KB")
    (out / "manifest.json").unlink()  # unfinished: the next run continues it with another plan
    foreign = {".notes.tmp": b"mine", ".train-00000.tar.123.tmp": b"not prepare's", "train-00042.tar": b"an old tar",
               "test-00009.idx": b"v1.2 0\n", "README": b"hello", ".progress/x.tar.json": b"{}"}
    for name, data in foreign.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    shard_mars(mars_tree, out, "--shard-size", "300KB")
    assert all((out / name).read_bytes() == data for name, data in foreign.items())
    assert verify(out) == []

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train-00000.tar").write_bytes(b"someone's archive")  # a folder prepare did not write
    capsys.readouterr()
    assert run_prepare("mars", "--data-dir", mars_tree, "--out", tmp_path / "other", "--workers", 1) == 2
    errors = error_lines(capsys.readouterr().err)
    assert errors == [f"prepare: error: {tmp_path / 'other'}: holds 1 other entries (e.g. train-00000.tar), not a "
                      "dataset prepared by `python -m prepare`, so prepare mars does not write there; choose another "
                      "--out"]
    assert (tmp_path / "other" / "train-00000.tar").read_bytes() == b"someone's archive"
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["train-00000.tar"]  # no lock or records left


def test_a_record_naming_a_file_outside_the_folder_is_refused(mars_tree, tmp_path, capsys):
    """A record in .prepare/ that names ../../victim (a copied or foreign unfinished folder) is refused, never
    followed: the old code deleted the victim as a shard 'of an earlier unfinished run with another plan'."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "a" / "b"
    shard_mars(mars_tree, out, "--shard-size", "200KB")
    (out / "manifest.json").unlink()  # an unfinished run: the next one removes recorded shards it does not plan
    record = json.loads((out / ".prepare" / "train-00000.tar.json").read_text())
    for name, index in (("train-00099.tar", "../../victim.txt"), ("train-00098.tar", str(victim))):
        (out / ".prepare" / f"{name}.json").write_text(json.dumps({**record, "name": name, "index": index}))
        capsys.readouterr()
        assert run_prepare("mars", "--data-dir", mars_tree, "--out", out, "--workers", 1, "--shard-size", "200KB") == 2
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and f"{name}.json: names the files" in errors[0] and "not a shard" in errors[0], errors
        assert victim.read_text() == "precious"
        (out / ".prepare" / f"{name}.json").unlink()
    (out / ".prepare" / "train-00000.tar.json").write_text(json.dumps({**record, "keys": ["../x"]}))
    assert run_prepare("mars", "--data-dir", mars_tree, "--out", out, "--workers", 1, "--shard-size", "200KB") == 2
    assert "lists the tracklet key '../x', not a plain key" in capsys.readouterr().err


def test_an_unfinished_run_with_another_plan_removes_only_its_own_shards(mars_tree, tmp_path, capsys):
    out = tmp_path / "out"
    shard_mars(mars_tree, out, "--shard-size", "100KB")
    (out / "manifest.json").unlink()  # as if killed just before the end
    recorded = {p.name[:-len(".json")] for p in (out / ".prepare").glob("*.tar.json")}
    (out / "train-00099.tar").write_bytes(b"not ours")
    capsys.readouterr()
    assert run_prepare("mars", "--data-dir", mars_tree, "--out", out, "--workers", 1, "--shard-size", "1MB") == 0
    err = capsys.readouterr().err
    reference = shard_mars(mars_tree, tmp_path / "ref", "--shard-size", "1MB")
    names = {s["name"] for s in reference["shards"]}
    assert names < recorded  # fewer, larger shards: the surplus recorded ones were removed, with a line each
    assert all(f"removing {n}" in err for n in recorded - names)
    assert {p.name for p in out.glob("*.tar")} == names | {"train-00099.tar"}
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()

"""What the manifest's hash cannot vouch for is checked where it is cheap: an edited manifest whose (unkeyed) hash
was recomputed is refused by train.py and eval.py (labels, pids, marks against the shards' JSON members); verify
refuses member names that climb out of the folder; inspect notices shards that belong to another dataset."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
from prepare_helpers import run_prepare, shard_mars
from tiny_checkpoint import tiny_checkpoint

from prepare.verify import verify
from stenvan.data import TrackletTable
from stenvan.shards import (ShardFormatError, format_index, load_manifest, read_index, seal_manifest, sha256_file,
                            tar_header)


@pytest.fixture(scope="module")
def prepared(mars_tree, module_tmp):
    root = module_tmp("integrity")
    shard_mars(mars_tree, root / "shards", "--shard-size", "200KB")
    return root / "shards"


def resealed(shards, tmp_path, edit) -> Path:
    """A copy of the dataset whose manifest `edit` changed, with its content hash recomputed (what the hash cannot
    catch: anyone can recompute an unkeyed sha256)."""
    out = tmp_path / "edited"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(seal_manifest(manifest), indent=1, sort_keys=True) + "\n")
    load_manifest(out)  # the hash passes
    return out


def one_line(capsys, tool, *args) -> str:
    capsys.readouterr()
    code = importlib.import_module(tool).main([str(a) for a in args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), (code, lines)
    return lines[0]


def test_train_refuses_labels_that_are_not_dense(prepared, tmp_path, capsys):
    def label_99(manifest):
        entry = manifest["splits"]["train"]["tracklets"][0]
        entry["label"] = 99
        manifest["splits"]["train"]["labels"][str(entry["pid"])] = 99
        for other in manifest["splits"]["train"]["tracklets"]:
            other["label"] = 99 if other["pid"] == entry["pid"] else other["label"]

    edited = resealed(prepared, tmp_path, label_99)
    with pytest.raises(ShardFormatError, match="ascending-pid numbering 0..n-1"):
        TrackletTable.from_dir(edited, "train")
    line = one_line(capsys, "train", "--data", edited, "--out", tmp_path / "run", "--arch", "baseline",
                    "--pretrained", "none", "--loader", "torch", "--workers", "0", "--device", "cpu")
    assert "ascending-pid numbering" in line and "content hash recomputed" in line
    assert not (tmp_path / "run").exists()


def test_eval_refuses_a_pid_that_the_shards_do_not_hold(prepared, tmp_path, capsys):
    def junk_becomes_an_identity(manifest):
        for entry in manifest["splits"]["gallery"]["tracklets"]:
            if entry["pid"] == -1:
                entry["pid"], entry["junk"] = 17, False
                break

    edited = resealed(prepared, tmp_path, junk_becomes_an_identity)
    line = one_line(capsys, "eval", "--checkpoint", tiny_checkpoint(tmp_path / "model.pt"), "--data", edited,
                    "--out", tmp_path / "eval", "--loader", "torch", "--workers", "0", "--device", "cpu")
    assert "gallery tracklet 00-1C" in line and "the manifest says pid 17 (shard: -1), junk False (shard: True)" \
        in line, line
    assert not (tmp_path / "eval").exists()


def rename_member(folder, shard: str, old: str, new: str) -> None:
    """Rename one member of a shard (a tar header rewritten in place), with an index and a manifest that agree."""
    tar, idx = folder / shard, folder / (shard[:-4] + ".idx")
    samples = read_index(idx)
    data = bytearray(tar.read_bytes())
    for members in samples:
        for i, m in enumerate(members):
            if m.name == old:
                data[m.offset - 512:m.offset] = tar_header(new, m.size)
                members[i] = m._replace(name=new)
    tar.write_bytes(bytes(data))
    idx.write_text(format_index(samples))
    manifest = json.loads((folder / "manifest.json").read_text())
    for s in manifest["shards"]:
        if s["name"] == shard:
            s["sha256"], s["index_sha256"] = sha256_file(tar), sha256_file(idx)
    (folder / "manifest.json").write_text(json.dumps(seal_manifest(manifest), indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("name, problem", [("../../evil.jpg", "climbs out with '..'"),
                                           ("/tmp/evil.jpg", "is absolute")])
def test_verify_refuses_member_names_that_escape_the_folder(prepared, tmp_path, name, problem):
    out = tmp_path / "shards"
    shutil.copytree(prepared, out)
    first = read_index(out / "train-00000.idx")[0][1].name  # the first frame of the first tracklet
    rename_member(out, "train-00000.tar", first, name)
    problems = verify(out)
    assert any(f"member {name!r} {problem}" in p for p in problems), problems


def test_inspect_notices_shards_of_another_dataset(prepared, tmp_path, capsys):
    from prepare.synthetic import generate

    generate("mars", tmp_path / "tree", num_ids=8, seed=2, min_len=2, max_len=30)
    other = tmp_path / "other"
    shard_mars(tmp_path / "tree", other, "--shard-size", "200KB")  # another dataset, the same shard names
    shutil.copy(prepared / "manifest.json", other / "manifest.json")
    capsys.readouterr()
    assert run_prepare("inspect", other) == 1
    out = capsys.readouterr().out
    assert "problem: " in out and "the shards beside manifest.json are not the ones it describes" in out
    assert run_prepare("inspect", prepared) == 0
    assert "problem" not in capsys.readouterr().out

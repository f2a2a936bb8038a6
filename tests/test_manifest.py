"""The manifest: malformed ones are one clear line in every consumer, edits are caught (content hash, and
verify's cross-checks against the shards' JSON members), and the dataset fingerprint is stable."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
from prepare_helpers import run_prepare, shard_mars

from prepare.verify import verify
from stenvan.shards import ShardFormatError, dataset_fingerprint, load_manifest, seal_manifest

TINY = ["--arch", "baseline", "--pretrained", "none", "--clip_len", "2", "--height", "32", "--width", "16",
        "--ids_per_batch", "2", "--tracklets_per_id", "2", "--batches_per_epoch", "1", "--workers", "0",
        "--loader", "torch", "--max_steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def mars_shards(mars_tree, module_tmp):
    out = module_tmp("manifest") / "shards"
    shard_mars(mars_tree, out, "--shard-size", "200KB")
    return out


@pytest.fixture(scope="module")
def checkpoint(mars_shards, module_tmp):
    """A real (one-step) training checkpoint, for eval.py."""
    run = module_tmp("manifest-run") / "run"
    assert importlib.import_module("train").main(["--data", str(mars_shards), "--out", str(run), *TINY]) == 0
    return run / "last.pt"


def edited(src, tmp_path, edit, seal=False):
    """A copy of the shard folder whose manifest went through `edit` (resealed: as if a faulty writer made it)."""
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    result = edit(manifest)
    manifest = manifest if result is None else result
    (out / "manifest.json").write_text(json.dumps(seal_manifest(manifest) if seal else manifest))
    return out


def _drop(m, *path):
    target = m
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


MALFORMED = {
    "a list": (lambda m: [], "holds a JSON list, not a stenvan manifest"),
    "no shards": (lambda m: _drop(m, "shards"), "lacks the field 'shards'"),
    "no query split": (lambda m: _drop(m, "splits", "query"), "split 'query' missing"),
    "entry without pid": (lambda m: _drop(m, "splits", "gallery", "tracklets", 3, "pid"),
                          "splits.gallery.tracklets[3] lacks the field 'pid'"),
    "pid as text": (lambda m: m["splits"]["train"]["tracklets"][0].update(pid="7"),
                    "splits.train.tracklets[0].pid is '7', expected an integer"),
    "shard outside the folder": (lambda m: m["shards"][0].update(name="../../etc/train-00000.tar"),
                                 "not a mars shard name"),
    "format version 1": (lambda m: m.update(version=1), "shard format version 1, this stenvan reads versions 2 and 3"),
    "edited, not resealed": (lambda m: m["splits"]["gallery"]["tracklets"][0].update(pid=99),
                             "does not match its manifest_sha256"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_one_line_in_every_consumer(case, mars_shards, checkpoint, tmp_path, capsys):
    edit, message = MALFORMED[case]
    bad = edited(mars_shards, tmp_path, edit)
    path = str(bad / "manifest.json")
    with pytest.raises(ShardFormatError, match="manifest"):
        load_manifest(bad)

    def one_line(code, stream, prefix):
        lines = [line for line in stream.strip().splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and lines[0].startswith(prefix), lines
        assert path in lines[0] and message in lines[0], lines[0]

    capsys.readouterr()
    one_line(run_prepare("verify", bad), capsys.readouterr().out, path)
    code = run_prepare("inspect", bad)
    one_line(code, capsys.readouterr().err, "prepare: error:")
    code = importlib.import_module("train").main(["--data", str(bad), "--out", str(tmp_path / "run"), *TINY])
    one_line(code, capsys.readouterr().err, "train: error:")
    code = importlib.import_module("eval").main(["--checkpoint", str(checkpoint), "--data", str(bad), "--loader",
                                                 "torch", "--workers", "0", "--device", "cpu",
                                                 "--out", str(tmp_path / "eval")])
    one_line(code, capsys.readouterr().err, "eval: error:")


def _first(m, split, **where):
    return next(e for e in m["splits"][split]["tracklets"] if all(e.get(k) == v for k, v in where.items()))


def _drop_gallery_entry(m):
    """Remove one plain gallery tracklet and fix every count, so that only the shards can tell."""
    gallery = m["splits"]["gallery"]
    entry = next(e for e in gallery["tracklets"] if not e["query"] and e["pid"] > 0
                 and sum(x["pid"] == e["pid"] for x in gallery["tracklets"]) > 1)
    gallery["tracklets"].remove(entry)
    gallery["num_tracklets"] -= 1
    gallery["num_frames"] -= entry["num_frames"]
    m["dropped"] = entry["key"]


@pytest.mark.parametrize("case, edit, messages", [
    ("pid", lambda m: _first(m, "train").update(pid=_first(m, "train")["pid"] + 2),
     ["the manifest says pid", "carry labels that do not follow their pids"]),
    ("camera", lambda m: _first(m, "gallery", query=False).update(camid=9), ["the manifest says camid 9"]),
    ("query mark", lambda m: _first(m, "gallery", query=False, junk=False).update(query=True),
     ["the manifest says query True (shard: False)", "not the set of gallery tracklets marked query"]),
    ("dropped entry", _drop_gallery_entry, ["is in no split of the manifest: an entry was dropped"]),
    ("dataset", lambda m: m.update(dataset="dukev"), ["not a dukev shard name"]),
])
def test_verify_compares_the_manifest_with_the_shards(case, edit, messages, mars_shards, tmp_path):
    bad = edited(mars_shards, tmp_path, edit, seal=True)  # a consistent hash: only the cross-checks can tell
    problems = "\n".join(verify(bad, deep=True))
    for message in messages:
        assert message in problems, problems
    if case == "dropped entry":
        dropped = json.loads((bad / "manifest.json").read_text())["dropped"]
        assert f"({dropped}.json)" in problems


def test_a_dukev_manifest_relabelled_mars_is_caught(dukev_tree, tmp_path):
    assert run_prepare("dukev", "--data-dir", dukev_tree, "--out", tmp_path / "s", "--workers", 1) == 0
    bad = edited(tmp_path / "s", tmp_path, lambda m: m.update(dataset="mars"), seal=True)
    assert "not a mars shard name" in "\n".join(verify(bad))


def test_the_fingerprint_identifies_the_dataset(mars_tree, mars_shards, tmp_path):
    again = tmp_path / "again"
    assert run_prepare("mars", "--data-dir", mars_tree, "--out", again, "--workers", 2, "--shard-size", "200KB") == 0
    first, second = load_manifest(mars_shards), load_manifest(again)
    assert dataset_fingerprint(first) == dataset_fingerprint(second)  # the same data prepared again, elsewhere
    assert dataset_fingerprint({**first, "writer": "stenvan 9.9"}) == dataset_fingerprint(first)
    other = json.loads(json.dumps(first))
    other["splits"]["gallery"]["tracklets"][0]["pid"] += 2
    assert dataset_fingerprint(other) != dataset_fingerprint(first)
    coarser = tmp_path / "coarser"
    assert run_prepare("mars", "--data-dir", mars_tree, "--out", coarser, "--workers", 1) == 0
    assert dataset_fingerprint(load_manifest(coarser)) != dataset_fingerprint(first)  # other shards


def test_verify_and_inspect_on_a_raw_dataset_say_what_it_is(mars_tree, dukev_tree, tmp_path, capsys):
    """The old line for a folder without manifest.json advised rerunning "the same prepare command" (which never
    ran): a raw dataset or any other folder is named as such."""
    from prepare_helpers import run_prepare

    (tmp_path / "empty").mkdir()
    for folder, expected in ((mars_tree, f"{mars_tree}: a raw mars dataset folder, not a prepared one"),
                             (dukev_tree, f"python -m prepare dukev --data-dir {dukev_tree} --out shards/dukev"),
                             (tmp_path / "empty", f"{tmp_path / 'empty'}: not a prepared dataset")):
        for command in ("verify", "inspect"):
            capsys.readouterr()
            code = run_prepare(command, folder)
            said = capsys.readouterr()
            text = said.out + said.err
            assert code != 0 and expected in text and "rerun" not in text, (command, text)

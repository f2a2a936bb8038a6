"""prepare: raw trees → shards; counts, determinism, resume after a kill, verify, DALI compatibility."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
from prepare_helpers import REPO, block_on_fifo, prepare_argv, run_prepare, shard_mars, wait_for
from scipy.io import loadmat

from prepare.verify import verify
from stenvan.shards import read_index, seal_manifest


def test_mars_counts_equal_the_info_files(tmp_path):
    from prepare.synthetic import generate

    tree = tmp_path / "MARS"
    generate("mars", tree, num_ids=6, seed=5, min_len=2, max_len=900)  # 2- and 900-frame tracklets
    m = shard_mars(tree, tmp_path / "shards", "--shard-size", "2MB")
    info = tree / "info"
    train = loadmat(info / "tracks_train_info.mat")["track_train_info"]
    test = loadmat(info / "tracks_test_info.mat")["track_test_info"]
    queries = loadmat(info / "query_IDX.mat")["query_IDX"][0]
    splits = m["splits"]
    assert splits["train"]["num_tracklets"] == len(train)
    assert splits["gallery"]["num_tracklets"] == len(test)
    assert splits["query"]["num_tracklets"] == len(queries)
    assert splits["train"]["num_frames"] == int((train[:, 1] - train[:, 0] + 1).sum())
    assert splits["gallery"]["num_frames"] == int((test[:, 1] - test[:, 0] + 1).sum())
    lengths = [t["num_frames"] for s in splits.values() for t in s["tracklets"]]
    assert min(lengths) == 2 and max(lengths) == 900
    # queries are exactly the query_IDX rows (1-based) and marked in the gallery
    gallery = splits["gallery"]["tracklets"]
    assert [t["key"] for t in splits["query"]["tracklets"]] == [gallery[q - 1]["key"] for q in sorted(queries)]
    assert sum(t["query"] for t in gallery) == len(queries)
    assert [t["pid"] for t in gallery if t["junk"]] and all(t["pid"] == -1 for t in gallery if t["junk"])
    assert [t["pid"] for t in gallery if t["distractor"]] and all(t["pid"] == 0 for t in gallery if t["distractor"])
    assert [(t["pid"], t["camid"]) for t in gallery] == [tuple(r) for r in test[:, 2:].tolist()]
    # train labels 0..#ids-1, in identity order
    labels = {t["pid"]: t["label"] for t in splits["train"]["tracklets"]}
    assert sorted(labels.values()) == list(range(len(set(train[:, 2]))))
    assert splits["train"]["num_ids"] == len(set(train[:, 2]))
    # shards: separate per group, identities never split, a tracklet's frames all in one sample
    placed = {}
    for split in splits.values():
        for t in split["tracklets"]:
            assert t["shard"].startswith("train-" if t in splits["train"]["tracklets"] else "test-")
            placed.setdefault(t["pid"], set()).add(t["shard"])
    assert all(len(shards) == 1 for pid, shards in placed.items() if pid > 0)
    assert len(m["shards"]) > 2  # the small shard size forced several shards
    assert verify(tmp_path / "shards", deep=True) == []


def test_dukev_end_to_end(dukev_tree, tmp_path):
    assert run_prepare("dukev", "--data-dir", dukev_tree, "--out", tmp_path / "s", "--workers", 2,
                       "--shard-size", "300KB") == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for split in ("train", "query", "gallery"):
        folders = sorted((dukev_tree / split).glob("*/*"))
        assert m["splits"][split]["num_tracklets"] == len(folders)
        assert m["splits"][split]["num_frames"] == sum(len(list(f.iterdir())) for f in folders)
        assert all(t["shard"].startswith(split + "-") for t in m["splits"][split]["tracklets"])
    query_keys = {t["key"] for t in m["splits"]["query"]["tracklets"]}
    assert {t["key"] for t in m["splits"]["gallery"]["tracklets"] if t["query"]} == query_keys
    assert m["splits"]["query"]["num_ids"] == len(query_keys)  # one query per test identity
    assert any(t["distractor"] for t in m["splits"]["gallery"]["tracklets"])
    assert verify(tmp_path / "s", deep=True) == []


def test_same_input_gives_identical_shards(mars_tree, tmp_path):
    a = shard_mars(mars_tree, tmp_path / "a", "--shard-size", "500KB")
    assert run_prepare("mars", "--data-dir", mars_tree, "--out", tmp_path / "b", "--workers", 2,
                       "--shard-size", "500KB") == 0  # other worker count, default --info-dir
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for s in a["shards"]:
        assert (tmp_path / "a" / s["name"]).read_bytes() == (tmp_path / "b" / s["name"]).read_bytes()


def test_resume_after_sigkill_ends_with_the_uninterrupted_bytes(mars_tree, copy_tree, tmp_path):
    reference = shard_mars(mars_tree, tmp_path / "ref", "--shard-size", "200KB")
    tree = copy_tree(mars_tree)
    restore = block_on_fifo(tree)
    out = tmp_path / "out"
    cmd = prepare_argv("mars", "--data-dir", tree, "--out", out, "--workers", 1, "--shard-size", "200KB")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Temporary files and records live in .prepare/, never beside the shards.
    wait_for(lambda: list((out / ".prepare").glob("*.tmp")) and list((out / ".prepare").glob("*.tar.json")), proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    finished = {p.name[:-len(".json")] for p in (out / ".prepare").glob("*.tar.json")}
    assert {p.name for p in out.glob("*.tar")} == finished  # no half shard under a final name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    restore()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"resuming, {len(finished)} of" in result.stderr
    assert "took over the stale lock" in result.stderr and f"pid {proc.pid}" in result.stderr
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["shards"] == reference["shards"]
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()
    assert not list((out / ".prepare").glob("*.tmp")) and not (out / ".lock").exists()


def test_verify_catches_a_single_flipped_byte(mars_tree, tmp_path):
    m = shard_mars(mars_tree, tmp_path / "s")
    assert run_prepare("verify", tmp_path / "s", "--deep") == 0
    shard = tmp_path / "s" / m["shards"][0]["name"]
    member = read_index(tmp_path / "s" / m["shards"][0]["index"])[0][1]  # the first frame
    data = bytearray(shard.read_bytes())
    data[member.offset + member.size // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify(tmp_path / "s")
    assert len(problems) == 1 and "sha256" in problems[0] and shard.name in problems[0]
    assert run_prepare("verify", tmp_path / "s") == 1


def test_verify_catches_index_and_count_damage(mars_tree, tmp_path):
    m = shard_mars(mars_tree, tmp_path / "s")
    idx = tmp_path / "s" / m["shards"][0]["index"]
    text = idx.read_text().split("\n")
    fields = text[1].split()
    fields[1] = str(int(fields[1]) + 512)  # the json member's offset now points at the wrong place
    idx.write_text("\n".join([text[0], " ".join(fields)] + text[2:]))
    m["splits"]["train"]["num_frames"] += 1
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    problems = verify(tmp_path / "s")  # the manifest no longer matches its content hash
    assert len(problems) == 1 and "does not match its manifest_sha256" in problems[0]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(seal_manifest(m)))  # as if a faulty writer made it
    problems = "\n".join(verify(tmp_path / "s"))
    assert "disagrees with the tar headers" in problems and "train.num_frames" in problems


def test_index_is_dalis_and_dali_reads_the_shards(mars_tree, tmp_path):
    m = shard_mars(mars_tree, tmp_path / "s")
    shard, index = tmp_path / "s" / m["shards"][0]["name"], tmp_path / "s" / m["shards"][0]["index"]
    # DALI ships its indexer as the module `wds2idx` (and the `wds2idx` script): its index is ours, byte for byte.
    # No DALI, no test: this fails rather than skips.
    made = subprocess.run([sys.executable, "-m", "wds2idx", str(shard), str(tmp_path / "ref.idx")],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "ref.idx").read_bytes() == index.read_bytes()
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        meta, frame = fn.readers.webdataset(paths=[str(shard)], index_paths=[str(index)], ext=["json", "00000.jpg"],
                                            missing_component_behavior="error")
        return meta, fn.decoders.image(frame, device="cpu")

    p = pipe()
    p.build()
    meta, image = p.run()
    first = m["splits"]["train"]["tracklets"][0]
    assert json.loads(np.asarray(meta[0]).tobytes())["key"] == first["key"]
    assert np.asarray(image[0]).shape == (256, 128, 3)


def test_webdataset_streams_the_shards(mars_tree, tmp_path):
    """The shards are plain WebDataset tars: `webdataset.WebDataset` yields one sample per tracklet, with its
    key, its JSON metadata and its frames, the original bytes, in order (the README's streaming recipe)."""
    import webdataset as wds

    m = shard_mars(mars_tree, tmp_path / "s", "--shard-size", "300KB")
    urls = [str(tmp_path / "s" / s["name"]) for s in m["shards"] if s["group"] == "train"]
    assert len(urls) > 1
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    entries = m["splits"]["train"]["tracklets"]
    assert [s["__key__"] for s in samples] == [e["key"] for e in entries]
    for sample, entry in zip(samples, entries):
        meta = json.loads(sample["json"])
        assert (meta["key"], meta["pid"], meta["camid"], meta["num_frames"]) == \
            (entry["key"], entry["pid"], entry["camid"], entry["num_frames"])
        frames = [sample[f"{i:05d}.jpg"] for i in range(meta["num_frames"])]
        assert {k for k in sample if not k.startswith("__")} == {"json", *(f"{i:05d}.jpg" for i in range(len(frames)))}
        assert frames == [(mars_tree / meta["source"] / name).read_bytes() for name in meta["frames"]]
    decoded = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("rgb8")))
    assert decoded["00000.jpg"].shape == (256, 128, 3) and decoded["json"]["key"] == entries[0]["key"]


def test_tracklet_table_reads_the_original_frames(mars_tree, tmp_path):
    """stenvan's shard reader (docs/preparing.md): each tracklet's labels from the manifest and its frames, the
    original bytes in temporal order, read by offset from the shards."""
    from stenvan import TrackletTable

    m = shard_mars(mars_tree, tmp_path / "s", "--shard-size", "300KB")
    for split in ("train", "query", "gallery"):
        table = TrackletTable.from_dir(tmp_path / "s", split)
        entries = m["splits"][split]["tracklets"]
        assert [(t.key, t.pid, t.camid, t.num_frames) for t in table.tracklets] == \
            [(e["key"], e["pid"], e["camid"], e["num_frames"]) for e in entries]
        for i in (0, len(table) - 1):
            meta = table.metadata(i)
            assert table.read_frames(i) == [(mars_tree / meta["source"] / name).read_bytes() for name in meta["frames"]]


def test_inspect_reports_splits(mars_tree, tmp_path, capsys):
    m = shard_mars(mars_tree, tmp_path / "s")
    capsys.readouterr()
    assert run_prepare("inspect", tmp_path / "s", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    for split in ("train", "query", "gallery"):
        s = summary["splits"][split]
        assert s["tracklets"] == m["splits"][split]["num_tracklets"]
        assert s["frames"] == m["splits"][split]["num_frames"]
        assert s["length_percentiles"]["p0"] <= s["length_percentiles"]["p50"] <= s["length_percentiles"]["p100"]
    assert run_prepare("inspect", tmp_path / "s") == 0
    assert "gallery" in capsys.readouterr().out

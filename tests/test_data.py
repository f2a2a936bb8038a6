"""stenvan.data without decoding: clip sampling, the P×K sampler, the training plan and the tracklet table."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from stenvan.data import (Augment, IdentitySampler, TrackletTable, TrainPlan, dense_chunks, eval_clips,
                          first_of_chunk_indices, restricted_random_indices)
from stenvan.shards import ShardFormatError


def original_chunks(num_frames: int, clip_len: int) -> list[list[int]]:
    """The chunk lists of the original STE-NVAN `utils.py` (Video_train_Dataset), transcribed for frames 0..F-1."""
    first, last = 0, num_frames - 1
    if num_frames < clip_len:
        strip = list(range(first, last + 1)) + [last] * (clip_len - num_frames)
        return [strip[s:s + 1] for s in range(clip_len)]
    interval = math.ceil(num_frames / clip_len)
    strip = list(range(first, last + 1)) + [last] * (interval * clip_len - num_frames)
    return [strip[s * interval:(s + 1) * interval] for s in range(clip_len)]


# ----------------------------------------------------------------------------------------------------------
# Clip sampling
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_frames", [1, 2, 5, 7, 8, 9, 15, 16, 17, 30, 63, 64, 65, 920])
def test_clip_indices_match_the_original_padding(num_frames):
    T = 8
    chunks = original_chunks(num_frames, T)
    assert first_of_chunk_indices(num_frames, T) == [c[0] for c in chunks]
    rng = np.random.default_rng(0)
    for _ in range(20):
        picks = restricted_random_indices(num_frames, T, rng)
        assert len(picks) == T and all(p in c for p, c in zip(picks, chunks))
        assert picks == sorted(picks)  # temporal order


def test_restricted_random_sampling_picks_each_chunk_uniformly():
    F, T, n = 30, 8, 4000  # I = 4; the padded list ends [28, 29, 29, 29]
    chunks = original_chunks(F, T)
    # Chunks 0..6 hold distinct frames: each of their 4 frames must come up about n/4 times.
    rng = np.random.default_rng(2)
    draws = np.array([restricted_random_indices(F, T, rng) for _ in range(n)])
    for s in range(T - 1):
        frames, freq = np.unique(draws[:, s], return_counts=True)
        assert frames.tolist() == sorted(set(chunks[s]))
        expected = n * np.array([chunks[s].count(f) for f in frames]) / len(chunks[s])
        chi2 = float(((freq - expected) ** 2 / expected).sum())
        assert chi2 < 16.3, (s, freq)  # chi-square, 3 degrees of freedom, p = 0.001
    # The last chunk [28, 29, 29, 29]: frame 29 three times as often as 28.
    frac = float((draws[:, T - 1] == 28).mean())
    assert abs(frac - 0.25) < 0.04


def test_dense_chunks_cover_every_frame_in_order():
    assert dense_chunks(3, 4) == [[0, 0, 1, 1], [2, 2, 2, 2]]
    assert dense_chunks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dense_chunks(9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 8, 8, 8]]
    assert dense_chunks(11, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 8, 9, 9], [10, 10, 10, 10]]
    for T in (4, 6, 8):
        for n in range(1, 40):
            clips = dense_chunks(n, T)
            assert all(len(c) == T for c in clips)
            assert [f for c in clips for f in dict.fromkeys(c)] == list(range(n))  # each frame once, in order
            for c in clips:  # a clip = its distinct frames, each repeated equally, in place
                assert all(c.count(f) == T // len(set(c)) for f in c) and c == sorted(c)


def test_eval_clips_modes():
    lengths = [3, 20, 8]
    paper = eval_clips(lengths, 8, "paper")
    assert [c.tracklet for c in paper] == [0, 1, 2]
    assert paper[1].frames == tuple(first_of_chunk_indices(20, 8))
    dense = eval_clips(lengths, 8, "dense")
    assert [c.tracklet for c in dense] == [0, 0, 1, 1, 1, 2]  # 3 = 2 + 1 frames, 20 = 8 + 8 + 4, 8
    with pytest.raises(ValueError, match="dense"):
        eval_clips(lengths, 8, "all")


# ----------------------------------------------------------------------------------------------------------
# P × K identity sampler
# ----------------------------------------------------------------------------------------------------------

def _labels(num_ids=40, seed=0):
    """Tracklet labels: each identity 1..5 tracklets, shuffled (tracklets of one id are not contiguous)."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[i] * int(rng.integers(1, 6)) for i in range(num_ids)])
    return rng.permutation(labels)


def test_sampler_batches_are_p_by_k_with_right_labels():
    labels = _labels()
    s = IdentitySampler(labels, P=8, K=4, seed=0)
    assert s.steps_per_epoch == 40 // 8 and s.batch_size == 32
    seen = []
    for step in range(s.steps_per_epoch):
        batch = s.batch(0, step)
        assert len(batch) == 32
        ids = labels[batch].reshape(8, 4)
        assert (ids == ids[:, :1]).all()  # K consecutive tracklets of one identity
        assert len(set(ids[:, 0])) == 8  # P distinct identities
        seen.extend(ids[:, 0])
    assert len(set(seen)) == len(seen)  # an epoch = one permutation: no identity twice


def test_sampler_draws_tracklets_with_replacement():
    labels = np.array([0, 1, 1, 2, 2, 2, 3, 3])  # identity 0 has one tracklet: K=4 needs replacement
    s = IdentitySampler(labels, P=4, K=4, seed=0)
    batch = s.batch(0, 0)
    assert sorted(batch[4 * s.identities(0, 0).index(0):][:4]) == [0, 0, 0, 0]


def interleave(shares):
    """The global batch from the ranks' shares: rank r of W holds positions r, r + W, r + 2W, ..."""
    return [share[i] for i in range(len(shares[0])) for share in shares]


@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 16])
def test_sampler_ranks_take_cross_sections_of_the_single_process_batch(world_size):
    labels = _labels()
    P, K = 8, 4
    single = IdentitySampler(labels, P=P, K=K, seed=5)
    ranks = [IdentitySampler(labels, P=P, K=K, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    assert {r.steps_per_epoch for r in ranks} == {single.steps_per_epoch}
    assert {r.ids_per_rank for r in ranks} == {min(P, P * K // world_size)}
    for epoch in (0, 3):
        for step in range(single.steps_per_epoch):
            shares = [r.batch(epoch, step) for r in ranks]
            assert all(len(b) == P * K // world_size for b in shares)
            assert interleave(shares) == single.batch(epoch, step)  # the union is exactly the W = 1 batch
            # Each share is a cross-section: min(P, P·K/W) identities (not P/W identities of K clips each).
            assert all(len(set(labels[b])) == min(P, P * K // world_size) for b in shares)
            for r, share in zip(ranks, shares):  # each sample on its own, as a stateless DALI callback sees it
                assert [r.tracklet_at(epoch, step, i) for i in range(len(share))] == share


def test_sampler_is_deterministic_and_resumable():
    labels = _labels()
    a = IdentitySampler(labels, P=8, K=4, seed=1, batches_per_epoch=12)  # 12 > 40 // 8: permutations chain
    b = IdentitySampler(labels, P=8, K=4, seed=1, batches_per_epoch=12)
    full = [a.batch(2, s) for s in range(12)]
    assert [b.batch(2, s) for s in range(7, 12)] == full[7:]  # any step on its own = resume
    assert full != [a.batch(3, s) for s in range(12)]  # epochs differ
    assert full != [IdentitySampler(labels, P=8, K=4, seed=2, batches_per_epoch=12).batch(2, s) for s in range(12)]


def test_sampler_errors():
    labels = _labels()
    with pytest.raises(ValueError, match="divisible by 3"):
        IdentitySampler(labels, P=8, K=4, seed=0, world_size=3)
    with pytest.raises(ValueError, match="only 40"):
        IdentitySampler(labels, P=64, K=4, seed=0)
    with pytest.raises(IndexError):
        IdentitySampler(labels, P=8, K=4, seed=0).batch(0, 5)


def test_train_plan_resumes_and_ranks_compose():
    labels = _labels()
    lengths = np.random.default_rng(0).integers(1, 100, size=len(labels))
    aug = Augment(64, 32, flip_p=0.5, pad=4, erase_p=0.5)
    single = TrainPlan(IdentitySampler(labels, 8, 4, seed=3), lengths, 8, aug)
    halves = [TrainPlan(IdentitySampler(labels, 8, 4, seed=3, rank=r, world_size=2), lengths, 8, aug)
              for r in range(2)]
    batch = single.batch(1, 2)
    assert interleave([halves[0].batch(1, 2), halves[1].batch(1, 2)]) == batch  # augmentation included
    assert [halves[1].sample(1, 2, i) for i in range(16)] == halves[1].batch(1, 2)
    assert {c.flip for c in batch} == {False, True} and len({c.crop for c in batch}) > 5
    erased = [c.erase for c in batch if c.erase[2]]
    assert erased and all(t + h <= 64 and l + w <= 32 for t, l, h, w in erased)
    # The frames do not depend on the augmentation options (drawn first from the same generator).
    plain = TrainPlan(IdentitySampler(labels, 8, 4, seed=3), lengths, 8, Augment(64, 32, flip_p=0.0))
    assert [c.frames for c in plain.batch(1, 2)] == [c.frames for c in batch]
    assert not any(c.flip or c.crop != (0, 0) for c in plain.batch(1, 2))


# ----------------------------------------------------------------------------------------------------------
# Tracklet table
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mars_shards(mars_tree, module_tmp):
    from prepare.cli import main

    out = module_tmp("data_shards") / "mars"
    assert main(["mars", "--data-dir", str(mars_tree), "--out", str(out), "--workers", "1"]) == 0
    return out


def test_table_matches_manifest_and_raw_frames(mars_shards, mars_tree):
    manifest = json.loads((mars_shards / "manifest.json").read_text())
    for split in ("train", "query", "gallery"):
        table = TrackletTable.from_dir(mars_shards, split)
        rows = manifest["splits"][split]["tracklets"]
        assert table.keys == [r["key"] for r in rows] and table.num_ids == manifest["splits"][split]["num_ids"]
        assert table.num_frames.tolist() == [r["num_frames"] for r in rows]
        if split == "train":
            assert table.labels.tolist() == [r["label"] for r in rows]
        else:
            assert (table.labels == -1).all()
    table = TrackletTable.from_dir(mars_shards, "gallery")
    store = table.store()
    for i in (0, len(table) // 2, len(table) - 1):  # frames by offset = the original files' bytes
        meta = table.metadata(i, store)
        assert meta["key"] == table.tracklets[i].key
        for f, loc in enumerate(table.frame_locations(i, range(table.tracklets[i].num_frames))):
            raw = (mars_tree / meta["source"] / meta["frames"][f]).read_bytes()
            assert store.read(*loc).tobytes() == raw
    store.close()


def _copy(src, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    return dst


def test_table_errors_name_the_file(mars_shards, tmp_path):
    d = _copy(mars_shards, tmp_path)
    (d / "train-00000.tar").unlink()
    with pytest.raises(ShardFormatError, match=r"train-00000\.tar: shard missing"):
        TrackletTable.from_dir(d, "train")
    TrackletTable.from_dir(d, "gallery")  # other splits do not need that shard

    d = _copy(mars_shards, tmp_path / "size")
    with open(d / "test-00000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardFormatError, match=r"test-00000\.tar: \d+ bytes but the manifest says \d+"):
        TrackletTable.from_dir(d, "query")

    d = _copy(mars_shards, tmp_path / "version")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["version"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"manifest\.json: shard format version 99"):
        TrackletTable.from_dir(d, "train")

    d = _copy(mars_shards, tmp_path / "index")
    (d / "train-00000.idx").unlink()
    with pytest.raises(ShardFormatError, match=r"train-00000\.idx: index file missing"):
        TrackletTable.from_dir(d, "train")

    d = _copy(mars_shards, tmp_path / "disagree")
    lines = (d / "train-00000.idx").read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # two samples swapped: the index no longer matches the manifest
    (d / "train-00000.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardFormatError, match=r"train-00000\.idx: sample 0"):
        TrackletTable.from_dir(d, "train")

    with pytest.raises(ShardFormatError, match="no such directory"):
        TrackletTable.from_dir(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split"):
        TrackletTable.from_dir(mars_shards, "test")

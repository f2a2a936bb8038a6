"""The DALI (CPU) and torch loaders on synthetic shards: contract, clip-consistent augmentation on pixels,
agreement between the backends, resume, ranks, and the eval loader's coverage."""

from __future__ import annotations

import math

import pytest
import torch

from stenvan.data import build_eval_loader, build_train_loader, dense_chunks
from stenvan.data.clips import IMAGENET_MEAN, IMAGENET_STD, augment_clip, normalize

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
SMALL = dict(P=4, K=2, clip_len=4, height=64, width=32, workers=1)


@pytest.fixture(scope="module")
def shards(mars_tree, dukev_tree, module_tmp):
    from prepare.cli import main

    out = module_tmp("loader_shards")
    assert main(["mars", "--data-dir", str(mars_tree), "--out", str(out / "mars"), "--workers", "1"]) == 0
    assert main(["dukev", "--data-dir", str(dukev_tree), "--out", str(out / "dukev"), "--workers", "1"]) == 0
    return out


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised clips in 0..255 pixel levels."""
    return ((a.float() - b.float()) * STD).abs()


def to_uint8(clips: torch.Tensor) -> torch.Tensor:
    return (clips.float() * STD + MEAN).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_train_loader_end_to_end_and_resume(shards, backend):
    """The DALI CPU pipeline (and the torch loader) end to end; epoch(e, start_step=s) = batches s.. of epoch e."""
    with build_train_loader(shards / "mars", seed=7, pad=4, erase_p=0.5, batches_per_epoch=3, backend=backend,
                            **SMALL) as loader:
        assert loader.steps_per_epoch == 3 and loader.num_classes == 4 and loader.batch_size == 8
        first = list(loader.epoch(0))
        assert len(first) == 3
        for step, b in enumerate(first):
            assert b["clips"].shape == (8, 4, 3, 64, 32) and b["clips"].dtype == torch.float32
            assert b["labels"].dtype == torch.int64 and b["camids"].dtype == torch.int64
            expected = [c.tracklet for c in loader.plan.batch(0, step)]
            assert b["tracklet"].tolist() == expected
            assert b["labels"].tolist() == loader.table.labels[expected].tolist()
            assert b["camids"].tolist() == loader.table.camids[expected].tolist()
            assert -2.2 < b["clips"].min() < b["clips"].max() < 2.7  # ImageNet-normalised
        second = list(loader.epoch(1))  # DALI: continues on the same pipeline
        assert not torch.equal(second[0]["clips"], first[0]["clips"])
        resumed = list(loader.epoch(0, start_step=2))  # DALI: a fresh pipeline starting mid-epoch
        assert len(resumed) == 1 and torch.equal(resumed[0]["clips"], first[2]["clips"])
        assert [torch.equal(a["clips"], b["clips"]) for a, b in zip(loader.epoch(1), second)] == [True] * 3
        partial = loader.epoch(0)
        next(partial)  # an epoch left unfinished: the next request starts a fresh pipeline
        assert torch.equal(next(iter(loader.epoch(0, start_step=1)))["clips"], first[1]["clips"])
        assert list(loader.epoch(0, start_step=3)) == []


def test_clip_augmentation_is_the_same_on_every_frame(shards):
    """Flip, pad-and-crop and erasing checked on pixels: every frame of a clip gets its clip's parameters."""
    common = dict(seed=11, batches_per_epoch=2, **SMALL)
    with build_train_loader(shards / "mars", flip_p=0.0, **common) as plain_loader:
        plain = list(plain_loader.epoch(0))
    with build_train_loader(shards / "mars", flip_p=0.5, pad=6, erase_p=0.5, **common) as loader:
        augmented = list(loader.epoch(0))
        specs = [loader.plan.batch(0, s) for s in range(2)]
    flat = [c for batch in specs for c in batch]
    assert {c.flip for c in flat} == {False, True} and any(c.erase[2] for c in flat)
    assert len({c.crop for c in flat}) > 4
    for p, a, batch in zip(plain, augmented, specs):
        source = to_uint8(p["clips"])
        for i, spec in enumerate(batch):
            expected = normalize(augment_clip(source[i], spec), torch.float32)
            assert levels(a["clips"][i], expected).max() < 0.01, spec
            assert not torch.equal(source[i, 0], source[i, -1]) or spec.frames[0] == spec.frames[-1]
            if spec.crop != (0, 0) or spec.flip:  # the other flip fails on every frame: the check can fail
                other = normalize(augment_clip(source[i], type(spec)(**{**spec.__dict__, "flip": not spec.flip})),
                                  torch.float32)
                assert all(levels(a["clips"][i, t], other[t]).max() > 1 for t in range(4))


def test_dali_and_torch_loaders_load_the_same_frames(shards):
    # Native size (no resize): both decode with libjpeg-turbo, augmentation applied the same way.
    native = dict(P=4, K=2, clip_len=4, height=256, width=128, workers=1, seed=3, pad=4, erase_p=0.5,
                  batches_per_epoch=1)
    out = {}
    for backend in ("dali", "torch"):
        with build_train_loader(shards / "mars", backend=backend, **native) as loader:
            out[backend] = next(iter(loader.epoch(0)))
    assert torch.equal(out["dali"]["tracklet"], out["torch"]["tracklet"])
    assert torch.equal(out["dali"]["labels"], out["torch"]["labels"])
    assert levels(out["dali"]["clips"], out["torch"]["clips"]).max() <= 1.01

    # With a resize (DALI vs torchvision antialiased bilinear): equal up to the resampling kernels.
    out = {}
    for backend in ("dali", "torch"):
        with build_train_loader(shards / "mars", backend=backend, seed=3, batches_per_epoch=1, **SMALL) as loader:
            out[backend] = next(iter(loader.epoch(0)))
    assert torch.equal(out["dali"]["tracklet"], out["torch"]["tracklet"])
    diff = levels(out["dali"]["clips"], out["torch"]["clips"])
    assert diff.mean() < 0.5 and (diff > 4).float().mean() < 0.01


def test_ranks_together_load_the_single_process_batch(shards):
    common = dict(seed=5, batches_per_epoch=2, dtype=torch.bfloat16, **SMALL)
    with build_train_loader(shards / "mars", **common) as loader:
        single = list(loader.epoch(1))
    ranks = []
    for rank in range(2):
        with build_train_loader(shards / "mars", rank=rank, world_size=2, **common) as loader:
            assert loader.steps_per_epoch == 2 and loader.batch_size == 4
            ranks.append(list(loader.epoch(1)))
    for step, whole in enumerate(single):
        assert whole["clips"].dtype == torch.bfloat16
        for key in ("clips", "labels", "tracklet"):  # rank r holds positions r, r + 2, ... of the batch
            assert torch.equal(torch.stack([ranks[0][step][key], ranks[1][step][key]], 1).flatten(0, 1), whole[key])
        # A cross-section: with K = 2 clips per identity over 2 ranks, each rank holds one clip of every identity.
        assert set(ranks[0][step]["labels"].tolist()) == set(ranks[1][step]["labels"].tolist()) == \
            set(whole["labels"].tolist())
    with pytest.raises(ValueError, match="divisible"):
        build_train_loader(shards / "mars", seed=0, rank=0, world_size=3, **SMALL)
    with pytest.raises(ValueError, match="backend"):
        build_train_loader(shards / "mars", seed=0, backend="ffcv", **SMALL)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_eval_loader_yields_every_tracklet_once_in_order(shards, backend):
    common = dict(clip_len=4, height=64, width=32, batch_size=5, backend=backend, workers=1)
    with build_eval_loader(shards / "mars", "gallery", mode="paper", dtype=torch.float16, **common) as loader:
        table = loader.table
        batches = list(loader)
        assert len(batches) == len(loader) == math.ceil(len(table) / 5)
        assert batches[0]["clips"].shape == (5, 4, 3, 64, 32) and batches[0]["clips"].dtype == torch.float16
        tracklets = torch.cat([b["tracklet"] for b in batches]).tolist()
        assert tracklets == list(range(len(table)))
        assert sum((b["keys"] for b in batches), []) == table.keys
        assert torch.cat([b["pids"] for b in batches]).tolist() == table.pids.tolist()
        assert torch.cat([b["camids"] for b in batches]).tolist() == table.camids.tolist()
        assert sum(len(b["clips"]) for b in list(loader)) == len(table)  # a second pass, same pipeline

    with build_eval_loader(shards / "dukev", "query", mode="dense", **common) as loader:  # variable frame sizes
        table = loader.table
        tracklets = torch.cat([b["tracklet"] for b in loader]).tolist()
        assert tracklets == [i for i, n in enumerate(table.num_frames) for _ in range(len(dense_chunks(n, 4)))]


def test_eval_loader_backends_agree_on_resized_frames(shards):
    out = {}
    for backend in ("dali", "torch"):
        with build_eval_loader(shards / "dukev", "gallery", clip_len=4, height=128, width=64, batch_size=64,
                               backend=backend, workers=1) as loader:
            out[backend] = next(iter(loader))
    assert out["dali"]["keys"] == out["torch"]["keys"]
    diff = levels(out["dali"]["clips"], out["torch"]["clips"])
    assert diff.mean() < 0.5 and (diff > 4).float().mean() < 0.01


def test_dali_workers_can_be_spawned(shards):
    """A process that holds a CUDA context spawns the DALI workers: the source must pickle and give the same data."""
    from stenvan.data import dali_loader

    with build_train_loader(shards / "mars", seed=2, batches_per_epoch=1, pad=2, **SMALL) as loader:
        forked = next(iter(loader.epoch(4)))
        source = dali_loader.TrainSource(loader.table, loader.plan, 4, 64, 32, first_epoch=4, first_step=0)
    pipe = dali_loader.build_pipeline(source, batch_size=8, height=64, width=32, device=torch.device("cpu"),
                                      workers=1, half=False, start_method="spawn")
    try:
        spawned = next(dali_loader.run_pipeline(pipe, source, torch.device("cpu"), torch.float32))
    finally:
        dali_loader.close_pipeline(pipe)
    assert torch.equal(spawned["clips"], forked["clips"]) and torch.equal(spawned["tracklet"], forked["tracklet"])

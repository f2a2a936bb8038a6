"""The loaders' contract beyond pixels: clips in the requested dtype and channels_last memory (the model takes them
without a copy), one DALI decoder per batch, P×K draws from all of an identity's tracklets, and a loader resumed
at step s that loads exactly the uninterrupted run's batches s.."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from stenvan.data import build_eval_loader, build_train_loader

SMALL = dict(P=4, K=2, clip_len=4, height=64, width=32, workers=1)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def shards(mars_tree, module_tmp):
    from prepare.cli import main

    out = module_tmp("contract_shards") / "mars"
    assert main(["mars", "--data-dir", str(mars_tree), "--out", str(out), "--workers", "1"]) == 0
    return out


def assert_channels_last_view(clips: torch.Tensor) -> None:
    """(B, T, 3, H, W) whose flattening to frames is channels_last and a view (a copy would move the data)."""
    assert clips.dim() == 5 and clips.shape[2] == 3
    frames = clips.flatten(0, 1)  # (B·T, 3, H, W)
    assert frames.data_ptr() == clips.data_ptr()
    assert frames.is_contiguous(memory_format=torch.channels_last) and not frames.is_contiguous()


# ----------------------------------------------------------------------------------------------------------
# dtype and memory layout
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_clips_arrive_in_the_requested_dtype_and_channels_last(shards, backend):
    batches = {}
    for dtype in DTYPES:
        with build_train_loader(shards, seed=4, pad=2, batches_per_epoch=1, backend=backend, dtype=dtype,
                                **SMALL) as loader:
            batches[dtype] = next(iter(loader.epoch(0)))
    reference = batches[torch.float32]["clips"]
    for dtype, batch in batches.items():
        assert batch["clips"].dtype == dtype and batch["clips"].shape == (8, 4, 3, 64, 32)
        assert_channels_last_view(batch["clips"])
        assert torch.equal(batch["tracklet"], batches[torch.float32]["tracklet"])
    # bf16 is rounded once from the float32 pixels (DALI has no bf16 output: float32, then one cast).
    assert torch.equal(batches[torch.bfloat16]["clips"], reference.to(torch.bfloat16))
    torch.testing.assert_close(batches[torch.float16]["clips"].float(), reference, rtol=0, atol=2e-3)

    with build_eval_loader(shards, "gallery", mode="dense", clip_len=4, height=64, width=32, batch_size=6,
                           backend=backend, dtype=torch.bfloat16, workers=1) as loader:
        batch = next(iter(loader))
        assert batch["clips"].dtype == torch.bfloat16
        assert_channels_last_view(batch["clips"])
        assert batch["real_frames"].tolist() == [len(set(c.frames)) for c in loader.clips[:6]]


def test_the_model_takes_the_clips_without_a_copy(shards):
    """forward_features flattens (B, T, 3, H, W) to frames: the stem's conv gets the loader's own memory."""
    import stenvan

    with build_train_loader(shards, seed=1, batches_per_epoch=1, backend="torch", **SMALL) as loader:
        clips = next(iter(loader.epoch(0)))["clips"][:1]
    torch.manual_seed(0)
    model = stenvan.build_model("baseline", 4).eval()
    seen = []
    model.backbone.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(clips)
        plain = model(clips.contiguous())  # the same clips in the default layout: the same features
    assert seen[0].data_ptr() == clips.data_ptr() and seen[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)


def test_dali_decodes_all_frames_of_a_batch_with_one_decoder(shards):
    """One decoder over B·T frames (nvJPEG batches of 32·8 frames, not T decoders of B frames each)."""
    with build_train_loader(shards, seed=0, batches_per_epoch=1, pad=2, erase_p=0.5, backend="dali",
                            **SMALL) as loader:
        loader.prepare(0)
        pipes = [loader._pipe]
        with build_eval_loader(shards, "query", clip_len=4, height=64, width=32, batch_size=5, workers=1) as ev:
            next(iter(ev))
            pipes.append(ev._pipe)
            for pipe, clips in zip(pipes, (8, 5)):
                decoders = [op.name for op in pipe._ops if "Image" in op.name]  # fn.decoders.image -> "__Image_N"
                assert len(decoders) == 1, decoders
                assert pipe.max_batch_size == clips * 4  # the pipeline's samples are frames


# ----------------------------------------------------------------------------------------------------------
# P × K draws
# ----------------------------------------------------------------------------------------------------------

def check_pk_draws(loader, epochs: int) -> None:
    """Every batch of the plan the loaders execute holds P identities × K clips, and each identity's K tracklets
    are drawn with replacement, uniformly, from all of its tracklets."""
    table, plan, P, K = loader.table, loader.plan, 4, 2
    members = {int(i): set(np.flatnonzero(table.labels == i).tolist()) for i in np.unique(table.labels)}
    drawn, repeats = defaultdict(Counter), 0
    for epoch in range(epochs):
        for step in range(loader.steps_per_epoch):
            specs = plan.batch(epoch, step)
            assert [plan.sample(epoch, step, i) for i in range(len(specs))] == specs  # what DALI's callback sees
            by_id = defaultdict(list)
            for spec in specs:
                by_id[int(table.labels[spec.tracklet])].append(spec.tracklet)
            assert len(by_id) == P and all(len(t) == K for t in by_id.values())
            for label, tracklets in by_id.items():
                assert set(tracklets) <= members[label]
                drawn[label].update(tracklets)
                repeats += len(members[label]) >= K and len(set(tracklets)) < K
    for label, tracklets in members.items():
        counts = [drawn[label][t] for t in sorted(tracklets)]
        assert min(counts) > 0, f"identity {label}: tracklets never drawn ({counts})"
        expected = sum(counts) / len(counts)
        stat = sum((c - expected) ** 2 / expected for c in counts)
        assert stat < chi2.ppf(0.999, len(counts) - 1), f"identity {label}: draws not uniform ({counts})"
    assert repeats > 0, "no identity ever drew a tracklet twice: not drawn with replacement"


def test_each_identity_draws_from_all_its_tracklets_with_replacement(shards, monkeypatch):
    with build_train_loader(shards, seed=3, batches_per_epoch=60, backend="torch", **SMALL) as loader:
        table = loader.table
        assert min(np.bincount(table.labels)) >= 3  # the check below can see a sampler that ignores tracklets
        check_pk_draws(loader, epochs=2)

        # The bug this test exists for: K copies of each identity's first tracklet. The check must catch it.
        sampler = loader.plan.sampler
        first = {int(i): int(np.flatnonzero(table.labels == i)[0]) for i in np.unique(table.labels)}
        batch, tracklet_at = sampler.batch, sampler.tracklet_at
        monkeypatch.setattr(sampler, "batch", lambda e, s: [first[int(table.labels[t])] for t in batch(e, s)])
        monkeypatch.setattr(sampler, "tracklet_at", lambda e, s, i: first[int(table.labels[tracklet_at(e, s, i)])])
        with pytest.raises(AssertionError, match="never drawn"):
            check_pk_draws(loader, epochs=2)
        delivered = next(iter(loader.epoch(0)))["tracklet"].tolist()  # the loader executes the sampler it has
        assert set(delivered) <= set(first.values())


# ----------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------

def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("clips", "labels", "camids", "tracklet"):
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_resumed_loader_loads_the_uninterrupted_runs_batches(shards, backend):
    """A fresh loader (as a resumed process builds it) at (epoch, step) = the uninterrupted run from there on."""
    common = dict(seed=9, pad=4, erase_p=0.5, batches_per_epoch=3, backend=backend, **SMALL)
    with build_train_loader(shards, **common) as loader:
        run = [b for epoch in range(3) for b in loader.epoch(epoch)]  # 9 steps, epochs continued in one go
    assert not torch.equal(run[4]["clips"], run[5]["clips"])  # steps differ: the comparison can fail
    for epoch, step in ((0, 2), (1, 1)):
        with build_train_loader(shards, **common) as resumed:
            rest = list(resumed.epoch(epoch, start_step=step))
            rest += [b for e in range(epoch + 1, 3) for b in resumed.epoch(e)]  # and the epochs after it
            expected = [c.tracklet for c in resumed.plan.batch(epoch, step)]
        assert rest[0]["tracklet"].tolist() == expected
        assert_same_batches(rest, run[3 * epoch + step:])

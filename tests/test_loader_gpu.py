"""The loaders on a GPU (skipped without CUDA): DALI's `mixed` decode (nvJPEG, with libjpeg's fancy chroma
upsampling) equals the CPU decode within IDCT rounding at the frames' own size (mean |difference| under 0.5 level
of 255, fewer than 0.5 % of values over 4 levels apart; nvJPEG's default upsampling differed by up to 8 levels at
colour edges) and within resampling differences after a resize (mean under 1 level, under 2 % over 8), the GPU
loaders load the same tracklets, frames, flips, crops and labels as the CPU loaders for the same seed, and a few
batches run without a host-device synchronisation (labels copied non-blocking from pinned memory)."""

from __future__ import annotations

import pytest
import torch

from stenvan.data import build_eval_loader, build_train_loader
from stenvan.data.clips import IMAGENET_STD

pytestmark = pytest.mark.gpu

STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def shards(mars_tree, dukev_tree, module_tmp):
    from prepare.cli import main

    out = module_tmp("gpu_shards")
    assert main(["mars", "--data-dir", str(mars_tree), "--out", str(out / "mars"), "--workers", "1"]) == 0
    assert main(["dukev", "--data-dir", str(dukev_tree), "--out", str(out / "dukev"), "--workers", "1"]) == 0
    return out


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised (B, T, 3, H, W) clips in 0..255 pixel levels, on the CPU."""
    return ((a.float().cpu() - b.float().cpu()) * STD).abs()


def assert_jpeg_close(a: torch.Tensor, b: torch.Tensor, resized: bool = False) -> None:
    """Two decoders of the same JPEGs (nvJPEG with fancy upsampling vs libjpeg-turbo: the same chroma upsampling,
    their IDCTs round differently): under half a level on average, fewer than 0.5 % of the values more than 4
    levels apart. `resized`: both then resized by different kernels (GPU and CPU, or DALI and torchvision): under
    a level on average, fewer than 2 % more than 8 apart. (The figures are in the message: the tight bounds are
    not measured on a GPU yet.)"""
    diff = levels(a, b)
    mean, far = (1.0, 8) if resized else (0.5, 4)
    over = float((diff > far).float().mean())
    assert diff.mean() < mean and over < (0.02 if resized else 0.005), (float(diff.mean()), float(diff.max()), over)


def first_batches(shard_dir, device, backend, n=2, **kw):
    with build_train_loader(shard_dir, backend=backend, device=device, batches_per_epoch=n, **kw) as loader:
        return list(loader.epoch(0))


@pytest.mark.parametrize("size", [(256, 128), (64, 32)], ids=["native", "resized"])
def test_mixed_decode_equals_cpu_decode(shards, size):
    """The GPU train loader (DALI mixed) = the CPU one for the same seed: same clips, labels, flips, crops."""
    common = dict(P=4, K=2, clip_len=4, height=size[0], width=size[1], workers=1, seed=3, pad=4, erase_p=0.5)
    gpu = first_batches(shards / "mars", CUDA, "dali", **common)
    cpu = first_batches(shards / "mars", torch.device("cpu"), "dali", **common)
    for g, c in zip(gpu, cpu):
        assert g["clips"].is_cuda and g["labels"].is_cuda
        for key in ("labels", "camids", "tracklet"):
            assert torch.equal(g[key].cpu(), c[key]), key
        assert_jpeg_close(g["clips"], c["clips"], resized=size != (256, 128))
        # The tolerance tells flips and frame choices apart: the same clips with every clip mirrored, or with its
        # frames in another order, are tens of levels away (measured on the CPU loaders: 12-70 and 7-44 levels).
        assert levels(g["clips"], c["clips"].flip(-1)).mean() > 4
        assert levels(g["clips"], c["clips"].roll(1, dims=1)).mean() > 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_loaders_deliver_channels_last_in_dtype_and_match_the_cpu_loaders(shards, dtype):
    common = dict(P=4, K=2, clip_len=4, height=64, width=32, workers=1, seed=5, dtype=dtype)
    reference = first_batches(shards / "mars", torch.device("cpu"), "torch", n=1, **common)[0]
    for backend in ("dali", "torch"):
        batch = first_batches(shards / "mars", CUDA, backend, n=1, **common)[0]
        clips = batch["clips"]
        assert clips.is_cuda and clips.dtype == dtype and clips.shape == (8, 4, 3, 64, 32)
        frames = clips.flatten(0, 1)  # (B·T, 3, H, W): a channels_last view, no copy
        assert frames.data_ptr() == clips.data_ptr() and frames.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(batch["tracklet"].cpu(), reference["tracklet"])
        if backend == "torch":  # the same decoder, normalised on the device: equal up to the rounding to dtype
            assert levels(clips, reference["clips"]).max() < (1.0 if dtype == torch.float32 else 2.0)
        else:
            assert_jpeg_close(clips, reference["clips"], resized=True)


def test_eval_loaders_on_the_gpu(shards):
    out = {}
    for device, backend in ((CUDA, "dali"), (CUDA, "torch"), (torch.device("cpu"), "dali")):
        with build_eval_loader(shards / "dukev", "gallery", mode="dense", clip_len=4, height=128, width=64,
                               batch_size=16, backend=backend, device=device, dtype=torch.bfloat16,
                               workers=1) as loader:
            out[device.type, backend] = next(iter(loader))
    reference = out["cpu", "dali"]
    for key in (("cuda", "dali"), ("cuda", "torch")):
        batch = out[key]
        assert batch["keys"] == reference["keys"] and torch.equal(batch["real_frames"], reference["real_frames"])
        assert batch["clips"].is_cuda and batch["clips"].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
        assert_jpeg_close(batch["clips"], reference["clips"], resized=True)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_batches_do_not_synchronise_the_host(shards, backend):
    """Labels, camids and tracklets go to the GPU from pinned memory without blocking; clips stay on the device."""
    with build_train_loader(shards / "mars", P=4, K=2, clip_len=4, height=64, width=32, workers=1, seed=0,
                            backend=backend, device=CUDA, dtype=torch.bfloat16, batches_per_epoch=4) as loader:
        loader.prepare(0)
        batches = loader.epoch(0)
        next(batches)  # start-up (worker start, allocations) may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in batches:
                assert batch["labels"].is_cuda and batch["camids"].is_cuda and batch["tracklet"].is_cuda
        finally:
            torch.cuda.set_sync_debug_mode("default")

"""Dense evaluation weighs every real frame of a tracklet the same (docs/evaluation.md): for a model whose clip
feature is the mean of per-frame features, a tracklet's dense feature is the mean over its frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stenvan.data import ClipSpec, TrackletTable
from stenvan.data.clips import load_clip, normalize
from stenvan.evaluation.evaluate import extract_split

SIZE = dict(clip_len=4, height=64, width=32)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29


@pytest.fixture(scope="module")
def shards(mars_tree, module_tmp):
    from prepare.cli import main

    out = module_tmp("dense_shards") / "mars"
    assert main(["mars", "--data-dir", str(mars_tree), "--out", str(out), "--workers", "1"]) == 0
    return out


class FrameMean(torch.nn.Module):
    """(B, T, 3, H, W) -> (B, 2048): the mean over the T frames of a fixed linear map of each frame's quadrant
    colours (a frame feature that differs from frame to frame)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(12, 2048, generator=torch.Generator().manual_seed(0)))

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 2048)
        return torch.nn.functional.adaptive_avg_pool2d(frames.float(), 2).flatten(1) @ self.proj  # (N, 12) @ W

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        batch, clip_len = clips.shape[:2]
        return self.frame_features(clips.flatten(0, 1)).view(batch, clip_len, -1).mean(1)  # (B, 2048)


def per_frame_means(model: FrameMean, shards, split: str) -> np.ndarray:
    """Each tracklet's mean frame feature, every frame decoded on its own (the same decoder as the torch loader)."""
    table = TrackletTable.from_dir(shards, split)
    store, out = table.store(), []
    for i, n in enumerate(table.num_frames.tolist()):
        frames = torch.cat([load_clip(table, store, ClipSpec(i, (f,)), SIZE["height"], SIZE["width"])
                            for f in range(n)])  # (F, 3, H, W) uint8
        out.append(model.frame_features(normalize(frames, torch.float32)).mean(0))
    return torch.stack(out).detach().numpy()


def test_dense_feature_is_the_mean_over_every_real_frame(shards):
    model = FrameMean().eval()
    expected = per_frame_means(model, shards, "gallery")
    table = TrackletTable.from_dir(shards, "gallery")
    assert any(n % 4 for n in table.num_frames) and any(n < 4 for n in table.num_frames)  # partial chunks occur
    dense, _ = extract_split(model, str(shards), "gallery", mode="dense", device=torch.device("cpu"),
                             precision="fp32", loader="torch", workers=0, batch_size=7, progress=False, **SIZE)
    np.testing.assert_allclose(dense, expected, rtol=1e-4, atol=1e-4)

    # Not vacuous: the old rule (last chunk padded with the last frame, clips averaged equally) misses by far.
    old = []
    with torch.no_grad():
        for i, n in enumerate(table.num_frames.tolist()):
            idx = np.minimum(np.arange(-(-n // 4) * 4), n - 1).reshape(-1, 4)
            clips = [load_clip(table, table.store(), ClipSpec(i, tuple(c.tolist())), 64, 32) for c in idx]
            old.append(model(normalize(torch.stack(clips), torch.float32)).mean(0))
    gap = np.abs(torch.stack(old).numpy() - expected).max(axis=1)
    assert (gap > 1e-2).sum() >= len(table) // 4


def test_dense_feature_dali_backend(shards):
    """The DALI eval loader carries the same clip weights: its dense features match the torch loader's."""
    model = FrameMean().eval()
    common = dict(mode="dense", device=torch.device("cpu"), precision="fp32", workers=1, batch_size=7,
                  progress=False, **SIZE)
    by_torch, _ = extract_split(model, str(shards), "query", loader="torch", **common)
    by_dali, _ = extract_split(model, str(shards), "query", loader="dali", **common)
    np.testing.assert_allclose(by_dali, by_torch, rtol=0, atol=0.05)  # resize kernels differ by ~1 level

"""Tests for stenvan.evaluation.plots: valid PNGs of plausible size, coloured frames, atomic writes."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from stenvan.evaluation import Tracklets, evaluate_all, plot_cmc, plot_ranked_list, query_distances, top_k_matches
from stenvan.evaluation.plots import STATUS_COLOURS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def small_eval(seed=0, n=300):
    rng = np.random.default_rng(seed)
    pids, cams = rng.integers(1, 40, n), rng.integers(1, 7, n)
    pids[:20], pids[20:40] = -1, 0
    is_q = np.zeros(n, bool)
    is_q[40:70] = True
    records = Tracklets([f"k{i}" for i in range(n)], pids, cams, is_q, np.ones(n, bool))
    # features clustered by id, so the curves are not all flat
    centres = torch.randn(41, 16)
    features = centres[torch.from_numpy(pids.clip(0))] + 0.8 * torch.randn(n, 16)
    return records, features


def assert_png(path, min_bytes):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    return imread(path)  # decodes: (H, W, 3 or 4) floats in [0, 1]


def test_plot_cmc_writes_png(tmp_path):
    records, features = small_eval()
    out = plot_cmc(evaluate_all(features, records), tmp_path / "cmc.png")
    image = assert_png(out, min_bytes=10_000)
    assert image.shape[0] >= 400 and image.shape[1] >= 600  # 6 x 4.5 in at 120 dpi
    # overwriting an existing file goes through the same temp-then-replace path
    plot_cmc(evaluate_all(features, records), out, max_rank=10)
    assert_png(out, min_bytes=10_000)


def thumbs(rng, count, h=64, w=32):
    return [rng.integers(0, 256, (h + 2 * i, w, 3), dtype=np.uint8) for i in range(count)]


def test_plot_ranked_list_frames_by_status(tmp_path):
    records, features = small_eval()
    indices, statuses = top_k_matches(query_distances(features, records), records, "official", k=10)
    rng = np.random.default_rng(1)
    rows = range(4)
    out = plot_ranked_list(thumbs(rng, 4), [thumbs(rng, 10) for _ in rows], [statuses[i] for i in rows],
                           tmp_path / "ranked.png", query_titles=[records.keys[q] for q in records.query_indices[:4]])
    image = (assert_png(out, min_bytes=20_000)[..., :3] * 255).round()
    for status in set(np.concatenate([statuses[i] for i in rows])):
        # every status used must show up as frame pixels of its colour
        close = np.abs(image - np.array(STATUS_COLOURS[status])).max(axis=-1) <= 12
        assert close.sum() > 50, status


def test_plot_ranked_list_accepts_ragged_rows_and_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(2)
    out = plot_ranked_list(thumbs(rng, 2), [thumbs(rng, 3), thumbs(rng, 1)],
                           [["correct", "junk", "wrong"], ["wrong"]], tmp_path / "ragged.png")
    assert_png(out, min_bytes=2_000)
    with pytest.raises(ValueError, match="unknown statuses"):
        plot_ranked_list(thumbs(rng, 1), [thumbs(rng, 1)], [["maybe"]], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        plot_ranked_list([np.zeros((8, 4, 3), np.float32)], [thumbs(rng, 1)], [["wrong"]], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="statuses in a row"):
        plot_ranked_list(thumbs(rng, 1), [thumbs(rng, 2)], [["wrong"]], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()

"""k-reciprocal re-ranking: a case worked by hand, an independent straightforward implementation, the protocols."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stenvan.evaluation import Tracklets, pairwise_distance
from stenvan.evaluation.rerank import re_ranking, rerank_distances


def straightforward(q_g, q_q, g_g, k1=20, k2=6, lam=0.3):
    """The paper's definitions with Python sets and dense float64 matrices, written independently of
    stenvan.evaluation.rerank (no partial sorts, no sparse matrices, Jaccard as Σmin / Σmax)."""
    nq = len(q_g)
    m = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    d = (m / m.max(axis=0)).T  # the reference's normalisation: by column maximum, then transposed
    n = len(d)
    ranks = np.argsort(d, axis=1, kind="stable")  # ties to the lower index

    def neighbours(i, k):
        return set(ranks[i, : k + 1].tolist())

    def reciprocal(i, k):
        return {j for j in neighbours(i, k) if i in neighbours(j, k)}

    half = int(np.around(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(rc & r) > 2 / 3 * len(rc):
                expanded |= rc
        idx = sorted(expanded)
        w = np.exp(-d[i, idx])
        v[i, idx] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[ranks[i, :k2]].mean(axis=0) for i in range(n)])
    final = np.empty((nq, n))
    for i in range(nq):
        for j in range(n):
            jaccard = 1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum()
            final[i, j] = (1 - lam) * jaccard + lam * d[i, j]
    return final[:, nq:]


def clustered(num_ids, per_id, dim, seed, noise=0.6):
    """Features of `num_ids` identities (a centre each plus noise), as re-id features look."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    pids = np.repeat(np.arange(num_ids), per_id)
    return (centres[pids] + noise * rng.normal(size=(len(pids), dim))).astype(np.float32), pids


def test_hand_checked_case():
    """1-D points q=0 | g1=1, g2=2, g3=10, Euclidean, k1=1 (2 nearest incl. self), k2=1, λ=0.3.

    Squared distances, each row over its maximum: q [0, .01, .04, 1]; g1 [1/81, 0, 1/81, 1]; g2 [.0625, 1/64, 0, 1].
    Nearest two: q {q, g1}; g1 {g1, q} (q and g2 tie at 1/81: the lower index wins); g2 {g2, g1}; g3 {g3, g2}.
    Reciprocal: R(q) = {q, g1}, R(g1) = {g1, q}, R(g2) = {g2}, R(g3) = {g3}; round(1/2) = 0 adds nothing.
    V[q] = (1, e^-.01)/(1 + e^-.01) on (q, g1); V[g1] = (e^(-1/81), 1)/(1 + e^(-1/81)) on (q, g1).
    """
    x = np.array([0.0, 1.0, 2.0, 10.0])
    dist = np.abs(x[:, None] - x[None, :]).astype(np.float32)
    out = re_ranking(dist[:1, 1:], dist[:1, :1], dist[1:, 1:], k1=1, k2=1, lambda_value=0.3)
    vq = np.array([1, math.exp(-0.01)]) / (1 + math.exp(-0.01))
    vg1 = np.array([math.exp(-1 / 81), 1]) / (1 + math.exp(-1 / 81))
    shared = np.minimum(vq, vg1).sum()
    expected = [0.7 * (1 - shared / (2 - shared)) + 0.3 * 0.01, 0.7 * 1 + 0.3 * 0.04, 0.7 * 1 + 0.3 * 1]
    assert out.dtype == np.float32 and out.shape == (1, 3)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    assert out[0, 0] == pytest.approx(0.010777, abs=1e-6)  # the number worked out on paper


@pytest.mark.parametrize("k1, k2, lam", [(20, 6, 0.3), (5, 1, 0.0), (3, 4, 1.0), (7, 3, 0.5)])
def test_equals_straightforward_implementation(k1, k2, lam):
    feats, _ = clustered(num_ids=12, per_id=6, dim=16, seed=k1)
    q, g = feats[:15], np.concatenate([feats[15:], feats[:5]])  # 5 queries also in the gallery: exact ties
    q_g, q_q, g_g = pairwise_distance(q, g), pairwise_distance(q, q), pairwise_distance(g, g)
    ours = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    np.testing.assert_allclose(ours, straightforward(q_g, q_q, g_g, k1, k2, lam), atol=1e-5, rtol=0)


def test_more_neighbours_than_nodes():
    """k1 and k2 larger than the problem (a tiny gallery): every list is cut at N, as the reference slices."""
    feats, _ = clustered(num_ids=3, per_id=3, dim=8, seed=5)
    q, g = feats[:2], feats[2:]
    args = (pairwise_distance(q, g), pairwise_distance(q, q), pairwise_distance(g, g))
    np.testing.assert_allclose(re_ranking(*args), straightforward(*args), atol=1e-5, rtol=0)


def test_reranking_helps_on_clustered_features():
    """Sanity of the direction: on features with identity structure, re-ranked mAP is not worse."""
    from stenvan.evaluation import evaluate_protocol

    feats, pids = clustered(num_ids=40, per_id=6, dim=32, seed=1, noise=1.2)
    camids = np.tile(np.arange(1, 7), 40)
    is_query = camids == 1
    records = Tracklets([f"t{i}" for i in range(len(pids))], pids + 1, camids, is_query, np.ones(len(pids), bool))
    plain = evaluate_protocol(pairwise_distance(feats[is_query], feats), records, "standard")
    reranked = evaluate_protocol(rerank_distances(feats, records, "standard"), records, "standard")
    assert reranked["mAP"] > plain["mAP"]


def test_each_protocol_reranks_its_own_gallery():
    feats, pids = clustered(num_ids=10, per_id=4, dim=16, seed=2)
    camids = np.tile(np.arange(1, 5), 10)
    pids = pids + 1
    pids[-4:] = -1  # junk: in the official gallery only
    is_query = (camids == 1) & (pids > 0)
    records = Tracklets([f"t{i}" for i in range(len(pids))], pids, camids, is_query, np.ones(len(pids), bool))
    for protocol, columns in (("official", np.arange(40)), ("standard", np.arange(36)),
                              ("torchreid", np.flatnonzero(~is_query[:36]))):
        dist = rerank_distances(feats, records, protocol)
        q, g = feats[is_query], feats[columns]
        expected = re_ranking(pairwise_distance(q, g), pairwise_distance(q, q), pairwise_distance(g, g))
        np.testing.assert_array_equal(dist[:, columns], expected)
        outside = np.setdiff1d(np.arange(40), columns)
        assert (dist[:, outside] == np.finfo(np.float32).max).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="expected"):
        re_ranking(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="k1"):
        re_ranking(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3)), k1=0)
    with pytest.raises(ValueError, match="NaN"):
        re_ranking(np.full((2, 3), np.nan), np.zeros((2, 2)), np.zeros((3, 3)))


def test_eval_reports_reranked_results_beside_the_plain_ones(mars_tree, tmp_path):
    """eval.py --rerank: <protocol>_rerank entries next to each protocol, in metrics.json and the printed table;
    the plain results are those of the features, untouched; the re-ranked ones are those of rerank_distances."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from prepare.cli import main as prepare_main
    from stenvan.evaluation import evaluate_all, evaluate_protocol, scalar_metrics
    from tiny_checkpoint import tiny_checkpoint

    repo = Path(__file__).resolve().parents[1]
    assert prepare_main(["mars", "--data-dir", str(mars_tree), "--out", str(tmp_path / "shards"), "--workers", "1"]) == 0
    tiny_checkpoint(tmp_path / "model.pt")
    base = [sys.executable, "eval.py", "--checkpoint", tmp_path / "model.pt", "--data", tmp_path / "shards", "--loader",
            "torch", "--workers", "1", "--out", tmp_path / "eval"]
    result = subprocess.run([*base, "--rerank"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    names = ["official", "standard", "torchreid"]
    assert [k for k in metrics if k in names or k.endswith("_rerank")] == \
        [n for name in names for n in (name, f"{name}_rerank")]
    assert metrics["rerank_params"] | {"seconds": 0} == {"k1": 20, "k2": 6, "lambda": 0.3, "seconds": 0}
    table = result.stdout.splitlines()
    for name in names:
        assert any(line.startswith(f"{name}_rerank ") for line in table)

    saved = np.load(tmp_path / "eval" / "features.npz")
    records = Tracklets(saved["keys"], saved["pids"], saved["camids"], saved["is_query"],
                        np.ones(len(saved["keys"]), bool))  # MARS: every test tracklet is in the gallery
    plain = scalar_metrics(evaluate_all(saved["features"], records))
    for name in names:
        assert metrics[name] == pytest.approx(plain[name])
        reranked = evaluate_protocol(rerank_distances(saved["features"], records, name), records, name)
        assert metrics[f"{name}_rerank"] == pytest.approx({k: v for k, v in reranked.items() if k != "cmc"})
        assert metrics[f"{name}_rerank"]["num_gallery"] == metrics[name]["num_gallery"]

    bad = subprocess.run([*base, "--rerank", "--rerank-k1", "0"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "k1 >= 1" in bad.stderr

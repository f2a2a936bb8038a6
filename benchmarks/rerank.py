"""k-reciprocal re-ranking at MARS size: time and peak memory of `eval.py --rerank` on the CPU, per protocol.

    python -m benchmarks.rerank [--ids 634 --queries 1980 --gallery 12180 --dim 2048]

Features are random with the structure of real re-id features: an identity centre, a camera shift and
per-tracklet noise (by default plain rank-1 ≈ 0.9, a trained model's range), MARS's counts of queries
(one per camera of an identity), gallery tracklets, junk (-1) and distractors (0). Peak memory is Python's
tracemalloc peak (numpy and scipy allocate through it) during the re-ranking of one protocol, its three
distance matrices included; the features themselves are allocated before.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from benchmarks.common import append_results, device_name, print_table, versions
from stenvan.evaluation import Tracklets, evaluate_protocol, gallery_mask, query_distances
from stenvan.evaluation.rerank import rerank_distances


def mars_like(num_ids: int, num_queries: int, num_gallery: int, dim: int, noise: float = 3.3, seed: int = 0):
    """(features float32 (N, dim), Tracklets) with MARS's layout: the gallery holds the queries."""
    rng = np.random.default_rng(seed)
    junk, distractors = num_gallery * 870 // 12180, num_gallery * 3200 // 12180  # MARS: ≈ 870 and ≈ 3,200
    real = num_gallery - junk - distractors
    pids = np.concatenate([rng.integers(1, num_ids + 1, size=real), np.zeros(distractors, int),
                           np.full(junk, -1)])
    camids = rng.integers(1, 7, size=num_gallery)
    # One query per (identity, camera) pair, up to num_queries, among the identities seen by two cameras.
    first = {}
    for i in np.flatnonzero(pids > 0):
        first.setdefault((pids[i], camids[i]), i)
    cams = {}
    for p, c in first:
        cams.setdefault(p, []).append(c)
    candidates = [first[(p, c)] for p, cs in cams.items() if len(cs) > 1 for c in cs]
    is_query = np.zeros(num_gallery, bool)
    is_query[rng.permutation(candidates)[:num_queries]] = True
    centres = rng.normal(size=(num_ids + 1, dim))
    camera_shift = rng.normal(scale=0.5, size=(7, dim))
    ident = np.where(pids > 0, pids, 0)
    feats = centres[ident] + camera_shift[camids] + rng.normal(scale=noise, size=(num_gallery, dim))
    feats[pids <= 0] = rng.normal(size=(int((pids <= 0).sum()), dim)) * 1.5  # no shared identity
    records = Tracklets([f"t{i}" for i in range(num_gallery)], pids, camids, is_query, np.ones(num_gallery, bool))
    return feats.astype(np.float32), records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", type=int, default=634)
    parser.add_argument("--queries", type=int, default=1980)
    parser.add_argument("--gallery", type=int, default=12180)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--noise", type=float, default=3.3, help="per-tracklet noise (std per dimension)")
    args = parser.parse_args(argv)
    feats, records = mars_like(args.ids, args.queries, args.gallery, args.dim, args.noise)
    plain = query_distances(feats, records)
    rows = []
    for protocol in ("official", "standard", "torchreid"):
        nodes = int(records.is_query.sum() + gallery_mask(records, protocol).sum())
        tracemalloc.start()
        start = time.perf_counter()
        dist = rerank_distances(feats, records, protocol)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        before, after = evaluate_protocol(plain, records, protocol), evaluate_protocol(dist, records, protocol)
        rows.append({"variant": protocol, "nodes": nodes, "seconds": seconds, "peak_mem_mib": peak / 2**20,
                     "plain_map": before["mAP"], "rerank_map": after["mAP"], "plain_rank1": before["rank1"],
                     "rerank_rank1": after["rank1"]})
    print_table(["protocol", "N = Nq + Ng", "seconds", "peak MiB", "rank-1", "rank-1 rerank", "mAP", "mAP rerank"],
                [[r["variant"], r["nodes"], r["seconds"], r["peak_mem_mib"], r["plain_rank1"], r["rerank_rank1"],
                  r["plain_map"], r["rerank_map"]] for r in rows],
                title=f"k-reciprocal re-ranking (k1=20, k2=6, λ=0.3), float32, {device_name('cpu')}")
    common = {"device": device_name("cpu"), "versions": versions(), "dim": args.dim, "noise": args.noise}
    append_results("rerank", [{**common, **r} for r in rows])


if __name__ == "__main__":
    main()

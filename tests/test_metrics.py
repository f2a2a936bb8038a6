"""Tests for stenvan.evaluation: distances, the three protocols of design §5 (hand-worked cases and a
plain-loop reference on random data), and each protocol's gallery/query selection. CPU, a few seconds."""

import json
from fractions import Fraction as Fr

import numpy as np
import pytest
import torch

from stenvan.evaluation import (
    PROTOCOLS,
    Tracklets,
    evaluate_all,
    evaluate_protocol,
    format_table,
    gallery_mask,
    official,
    pairwise_distance,
    scalar_metrics,
    standard,
    top_k_matches,
    torchreid,
)


def make_records(rows, keys=None):
    """rows: (pid, camid, is_query, in_gallery) per tracklet."""
    pids, cams, is_q, in_g = zip(*rows)
    keys = keys or [f"t{i:04d}" for i in range(len(rows))]
    return Tracklets(keys, np.array(pids), np.array(cams), np.array(is_q, bool), np.array(in_g, bool))


def dist_rows(records, rows_by_query):
    """Distance matrix from {record index: distance} per query; unlisted records are far (1.0 + j/100)."""
    n = len(records)
    dist = np.tile(1.0 + np.arange(n) / 100, (len(rows_by_query), 1)).astype(np.float32)
    for r, row in enumerate(rows_by_query):
        for j, d in row.items():
            dist[r, j] = d
    return dist


# ---------------------------------------------------------------------------------------------- distances


def test_cosine_distance_matches_numpy():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((7, 16)), rng.standard_normal((11, 16))
    expected = 1 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    got = pairwise_distance(torch.from_numpy(q), torch.from_numpy(g), "cosine")
    assert got.dtype == np.float32 and got.shape == (7, 11)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # scale invariance: cosine works on L2-normalised features
    np.testing.assert_allclose(pairwise_distance(5 * q, 0.1 * g, "cosine"), got, atol=1e-6)


def test_euclidean_distance_matches_brute_force_despite_offset():
    rng = np.random.default_rng(1)
    # a large shared offset is where |q|²+|g|²−2q·g loses float32 precision without centring
    q, g = 100 + rng.standard_normal((9, 32)), 100 + rng.standard_normal((13, 32))
    expected = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(pairwise_distance(q, g, "euclidean"), expected, rtol=1e-4, atol=1e-4)


def test_distance_chunking_and_half_precision():
    rng = np.random.default_rng(2)
    q, g = torch.from_numpy(rng.standard_normal((10, 8))), torch.from_numpy(rng.standard_normal((5, 8)))
    for metric in ("cosine", "euclidean"):
        whole = pairwise_distance(q, g, metric, chunk_size=1024)
        np.testing.assert_allclose(pairwise_distance(q, g, metric, chunk_size=3), whole, atol=1e-6)
        np.testing.assert_allclose(pairwise_distance(q.half(), g.half(), metric), whole, atol=2e-2)
    with pytest.raises(ValueError, match="valid: cosine, euclidean"):
        pairwise_distance(q, g, "manhattan")
    with pytest.raises(ValueError):
        pairwise_distance(q, g[:, :4])


@pytest.mark.gpu
def test_distance_on_cuda_matches_cpu():
    q, g = torch.randn(300, 64), torch.randn(400, 64)
    for metric in ("cosine", "euclidean"):
        np.testing.assert_allclose(pairwise_distance(q.cuda(), g.cuda(), metric, chunk_size=128),
                                   pairwise_distance(q, g, metric), atol=1e-4)


# ------------------------------------------------------------------------------------ hand-worked protocol

# MARS-like: every record is in the gallery, queries included.
HAND_ROWS = [
    (1, 1, True, True),     # 0  query A
    (1, 1, False, True),    # 1  A's id, A's camera: junk for A
    (1, 2, False, True),    # 2  good for A
    (1, 3, False, True),    # 3  good for A
    (0, 2, False, True),    # 4  distractor: an ordinary negative
    (-1, 2, False, True),   # 5  junk label
    (2, 3, False, True),    # 6  good for B
    (2, 1, True, True),     # 7  query B
    (3, 2, True, True),     # 8  query C: its id's only other tracklet (9) shares its camera: no match
    (3, 2, False, True),    # 9
    (4, 1, True, True),     # 10 query D \ each other's only cross-camera match: torchreid takes both
    (4, 2, True, True),     # 11 query E / out of its gallery, so neither is scored there
]
HAND_DIST = [  # one row per query, in record order (A, B, C, D, E)
    {0: 0.0, 7: 0.05, 1: 0.1, 5: 0.2, 2: 0.3, 4: 0.4, 6: 0.5, 3: 0.6},
    {7: 0.0, 5: 0.05, 4: 0.1, 1: 0.2, 6: 0.3, 0: 0.4, 2: 0.5, 3: 0.6},
    {8: 0.0, 9: 0.1},
    {10: 0.0, 11: 0.1},
    {11: 0.0, 10: 0.1},
]
# Worked by hand. Ranked lists after removing junk (w = wrong, G = good):
#  official/standard, A: 0,1,5 are junk -> 7w 2G 4w 6w 3G   (first hit at rank 2, hits at ranks 2 and 5)
#    trapezoid: ranks 1..5 have precision 0, 1/2, 1/3, 1/4, 2/5; starting from precision 1 at rank 0,
#      hit 1: (0 + 1/2)/2 = 1/4; hit 2: (1/4 + 2/5)/2 = 13/40; AP = (1/4 + 13/40)/2 = 23/80 = 0.2875
#    non-interpolated: (1/2 + 2/5)/2 = 9/20 = 0.45
#  B: 7, 5 junk -> 4w 1w 6G: trapezoid (0 + 1/3)/2 = 1/6; non-interpolated 1/3 (first hit rank 3)
#  C: no good match: AP 0, no hit (scored in official/standard).  D, E: partner first: AP 1, rank 1.
#  torchreid: gallery {1,2,3,4,6,9}. A: 1 junk -> 2G 4w 6w 3G: (1 + 2/4)/2 = 3/4, rank 1.
#    B: 4w 1w 6G: 1/3, rank 3.  C, D, E skipped.
HAND_EXPECTED = {
    "official": dict(mAP=(Fr(23, 80) + Fr(1, 6) + 0 + 1 + 1) / 5, rank1=Fr(2, 5), rank5=Fr(4, 5),
                     num_queries=5, num_gallery=12),
    "standard": dict(mAP=(Fr(9, 20) + Fr(1, 3) + 0 + 1 + 1) / 5, rank1=Fr(2, 5), rank5=Fr(4, 5),
                     num_queries=5, num_gallery=11),
    "torchreid": dict(mAP=(Fr(3, 4) + Fr(1, 3)) / 2, rank1=Fr(1, 2), rank5=Fr(1), num_queries=2,
                      num_gallery=6),
}


@pytest.fixture
def hand_case():
    records = make_records(HAND_ROWS)
    return records, dist_rows(records, HAND_DIST)


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_hand_worked_protocols(hand_case, name):
    records, dist = hand_case
    got, want = evaluate_protocol(dist, records, name), HAND_EXPECTED[name]
    assert got["mAP"] == pytest.approx(float(want["mAP"]), abs=1e-12)
    assert got["rank1"] == pytest.approx(float(want["rank1"]))
    assert got["rank5"] == got["rank10"] == got["rank20"] == pytest.approx(float(want["rank5"]))
    assert (got["num_queries"], got["num_gallery"]) == (want["num_queries"], want["num_gallery"])
    assert len(got["cmc"]) == want["num_gallery"]


def test_hand_worked_cmc_and_named_functions(hand_case):
    records, dist = hand_case
    # first hits: A rank 2, B rank 3, C none, D 1, E 1
    np.testing.assert_allclose(official(dist, records)["cmc"], [0.4, 0.6] + [0.8] * 10)
    np.testing.assert_allclose(standard(dist, records)["cmc"], [0.4, 0.6] + [0.8] * 9)
    np.testing.assert_allclose(torchreid(dist, records)["cmc"], [0.5, 0.5, 1, 1, 1, 1])


def test_trapezoid_and_non_interpolated_single_query():
    # hits at ranks 1 and 3 of 2 good: non-interpolated (1/1 + 2/3)/2 = 5/6;
    # trapezoid: hit 1 (1 + 1)/2 = 1, rank 2 precision 1/2, hit 2 (1/2 + 2/3)/2 = 7/12 -> (1 + 7/12)/2 = 19/24
    records = make_records([(5, 1, True, True), (5, 2, False, True), (6, 2, False, True), (5, 3, False, True)])
    dist = np.array([[0.0, 0.1, 0.2, 0.3]], np.float32)
    assert official(dist, records)["mAP"] == pytest.approx(19 / 24)
    assert standard(dist, records)["mAP"] == pytest.approx(5 / 6)
    assert torchreid(dist, records)["mAP"] == pytest.approx(5 / 6)


def test_ties_keep_record_order_deterministically():
    # wrong (record 1) and good (record 2) at the same distance: the stable sort ranks record 1 first
    tie = np.array([[0.0, 0.5, 0.5]], np.float32)
    wrong_first = make_records([(1, 1, True, True), (2, 2, False, True), (1, 2, False, True)])
    r = standard(tie, wrong_first)
    assert (r["rank1"], r["mAP"]) == (0.0, 0.5)
    assert official(tie, wrong_first)["mAP"] == pytest.approx(0.25)  # (0 + 1/2)/2
    assert [standard(tie, wrong_first)["mAP"] for _ in range(3)] == [0.5] * 3
    good_first = make_records([(1, 1, True, True), (1, 2, False, True), (2, 2, False, True)])
    assert (standard(tie, good_first)["rank1"], standard(tie, good_first)["mAP"]) == (1.0, 1.0)
    _, statuses = top_k_matches(tie, wrong_first, "standard", k=3)
    assert statuses.tolist() == [["junk", "wrong", "correct"]]


def test_dukev_layout_query_copies_are_junk_and_galleries_agree():
    # DukeV as shipped: query records outside the gallery, the gallery holds a copy of each query
    records = make_records(
        [(1, 1, True, False), (1, 1, False, True), (1, 2, False, True), (2, 2, False, True), (7, 3, False, True)],
        keys=["query/0001/0001", "gallery/0001/0001", "gallery/0001/0002", "gallery/0002/0001", "gallery/0007/0001"],
    )
    dist = np.array([[0.0, 0.0, 0.3, 0.2, 0.9]], np.float32)  # the copy is identical to the query
    for name in PROTOCOLS:
        r = evaluate_protocol(dist, records, name)
        assert (r["num_gallery"], r["num_queries"]) == (4, 1)
        assert r["rank1"] == 0.0 and r["rank5"] == 1.0  # copy skipped as junk, then 0002 (wrong), then good
    assert official(dist, records)["mAP"] == pytest.approx(0.25)
    assert standard(dist, records)["mAP"] == pytest.approx(0.5)


def test_top_k_matches_statuses(hand_case):
    records, dist = hand_case
    idx, st = top_k_matches(dist, records, "official", k=5)
    assert idx[0].tolist() == [0, 7, 1, 5, 2]
    assert st[0].tolist() == ["junk", "wrong", "junk", "junk", "correct"]
    idx, st = top_k_matches(dist, records, "torchreid", k=10)
    assert idx.shape == (5, 6)  # capped at the torchreid gallery size
    assert idx[0].tolist() == [1, 2, 4, 6, 3, 9]
    assert st[0].tolist() == ["junk", "correct", "wrong", "wrong", "correct", "wrong"]


def test_invalid_inputs_are_rejected(hand_case):
    records, dist = hand_case
    with pytest.raises(ValueError, match="unique"):
        make_records([(1, 1, True, True), (1, 2, False, True)], keys=["a", "a"])
    for bad_pid in (-1, 0):
        with pytest.raises(ValueError, match="queries carry"):
            make_records([(bad_pid, 1, True, True), (1, 2, False, True)])
    with pytest.raises(ValueError, match="boolean"):
        Tracklets(["a", "b"], np.array([1, 1]), np.array([1, 2]), np.array([1, 0]), np.array([True, True]))
    with pytest.raises(ValueError, match="shape"):
        official(dist[:, :-1], records)
    with pytest.raises(ValueError, match="NaN"):
        official(np.where(dist > 0.5, np.nan, dist), records)
    with pytest.raises(ValueError, match="valid: official, standard, torchreid"):
        evaluate_protocol(dist, records, "market")


# ------------------------------------------------------------------ reference implementation, random data


def matlab_compute_ap(good, junk, index):
    """Line-by-line port of MARS-evaluation utils/compute_AP.m (0-based n here): returns (ap, first rank)."""
    cmc = [0] * len(index)
    ngood = len(good)
    old_recall, old_precision, ap = 0.0, 1.0, 0.0
    intersect_size = j = good_now = njunk = 0
    for n, item in enumerate(index):
        flag = 0
        if item in good:
            cmc[n - njunk:] = [1] * (len(index) - (n - njunk))
            flag = 1
            good_now += 1
        if item in junk:
            njunk += 1
            continue
        if flag == 1:
            intersect_size += 1
        recall = intersect_size / ngood
        precision = intersect_size / (j + 1)
        ap = ap + (recall - old_recall) * ((old_precision + precision) / 2)
        old_recall, old_precision = recall, precision
        j += 1
        if good_now == ngood:
            break
    return ap, cmc.index(1) + 1


def mean_precision_ap(good, junk, index):
    """sklearn/torchreid-style AP: mean of the precision at each hit, junk removed first."""
    kept = [item for item in index if item not in junk]
    precisions, hits = [], 0
    for position, item in enumerate(kept, start=1):
        if item in good:
            hits += 1
            precisions.append(hits / position)
    first = next(p for p, item in enumerate(kept, start=1) if item in good)
    return sum(precisions) / len(good), first


def reference(dist, pids, cams, is_q, in_g, protocol):
    gallery = [j for j in range(len(pids)) if in_g[j]
               and not (protocol != "official" and pids[j] == -1)
               and not (protocol == "torchreid" and is_q[j])]
    aps, firsts = [], []
    for row, q in enumerate(i for i in range(len(pids)) if is_q[i]):
        d = dist[row].tolist()
        index = sorted(gallery, key=lambda j: (d[j], j))
        good = {j for j in gallery if pids[j] == pids[q] and cams[j] != cams[q]}
        junk = {j for j in gallery if pids[j] == -1 or (pids[j] == pids[q] and cams[j] == cams[q])}
        if not good:
            if protocol != "torchreid":  # scored: AP 0, no CMC hit
                aps.append(0.0)
                firsts.append(None)
            continue
        ap, first = (matlab_compute_ap if protocol == "official" else mean_precision_ap)(good, junk, index)
        aps.append(ap)
        firsts.append(first)
    cmc = [sum(f is not None and f <= k for f in firsts) / len(firsts) for k in range(1, len(gallery) + 1)]
    return dict(mAP=sum(aps) / len(aps), rank1=cmc[0], rank5=cmc[4], rank10=cmc[9], rank20=cmc[19],
                num_queries=len(aps), num_gallery=len(gallery), cmc=cmc)


def random_case(layout, seed):
    """200 queries, ~2,000 gallery tracklets, random ids (many ids span one camera only), quantised
    distances (many ties); MARS layout: junk and distractors, queries in the gallery; DukeV: copies."""
    rng = np.random.default_rng(seed)
    n = 2000
    pids = rng.integers(1, 500, n)
    cams = rng.integers(1, 7, n)
    if layout == "mars":
        pids[rng.random(n) < 0.08] = -1
        pids[rng.random(n) < 0.10] = 0
        is_q = np.zeros(n, bool)
        is_q[rng.choice(np.flatnonzero(pids > 0), 200, replace=False)] = True
        in_g = np.ones(n, bool)
    else:
        copies = rng.choice(n, 200, replace=False)
        pids, cams = np.concatenate([pids[copies], pids]), np.concatenate([cams[copies], cams])
        is_q, in_g = np.arange(n + 200) < 200, np.arange(n + 200) >= 200
    records = Tracklets([f"k{i}" for i in range(len(pids))], pids, cams, is_q, in_g)
    dist = (rng.integers(0, 40, (200, len(pids))) / 40).astype(np.float32)
    return records, dist


@pytest.mark.parametrize("layout", ["mars", "dukev"])
def test_protocols_match_reference_on_random_data(layout):
    records, dist = random_case(layout, seed=3)
    args = (records.pids.tolist(), records.camids.tolist(), records.is_query.tolist(), records.in_gallery.tolist())
    results = {name: evaluate_protocol(dist, records, name) for name in PROTOCOLS}
    for name, got in results.items():
        want = reference(dist, *args, name)
        for key in ("mAP", "rank1", "rank5", "rank10", "rank20"):
            assert got[key] == pytest.approx(want[key], abs=1e-12), (name, key)
        assert (got["num_queries"], got["num_gallery"]) == (want["num_queries"], want["num_gallery"]), name
        np.testing.assert_allclose(got["cmc"], want["cmc"], atol=1e-12)
    # the case must exercise what it claims: unmatched queries (torchreid scores fewer), AP rules differ
    assert results["torchreid"]["num_queries"] < results["official"]["num_queries"] == 200
    assert results["official"]["mAP"] < results["standard"]["mAP"]


# ----------------------------------------------------------------------- gallery and query selection


def mars_like_labels(seed=4):
    """MARS-style test split: ids spanning 1-4 cameras, one query per camera of each multi-camera id,
    plus distractors (0) and junk (-1). Ids 2 and 4 have exactly one tracklet in each of two cameras:
    both tracklets are queries, so torchreid (queries out of the gallery) has nothing to match them with."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(2, 122, 2):
        if pid <= 4:
            per_cam = {1: 1, 2: 1}
        else:
            cams = rng.choice(np.arange(1, 7), rng.integers(1, 5), replace=False)
            per_cam = {int(c): int(rng.integers(1, 4)) for c in cams}
        for cam, count in per_cam.items():
            for t in range(count):
                rows.append((pid, cam, len(per_cam) > 1 and t == 0, True))
    rows += [(0, int(c), False, True) for c in rng.integers(1, 7, 40)]
    rows += [(-1, int(c), False, True) for c in rng.integers(1, 7, 30)]
    order = rng.permutation(len(rows))  # labels, not positions, decide the split
    return make_records([rows[i] for i in order])


def test_gallery_and_query_selection_counts():
    records = mars_like_labels()
    n, n_query, n_junk = len(records), int(records.is_query.sum()), int((records.pids == -1).sum())
    assert gallery_mask(records, "official").sum() == n
    assert gallery_mask(records, "standard").sum() == n - n_junk
    assert gallery_mask(records, "torchreid").sum() == n - n_query - n_junk

    # torchreid scores a query only if a non-query tracklet of its id sits in another camera
    rows = list(zip(records.pids.tolist(), records.camids.tolist(), records.is_query.tolist()))
    matchable = sum(any(p2 == p and c2 != c and not q2 for p2, c2, q2 in rows) for p, c, q in rows if q)
    assert matchable <= n_query - 4  # ids 2 and 4 (two queries each) lose their only match

    features = torch.randn(n, 32)
    results = evaluate_all(features, records, metric="cosine")
    counts = {name: (r["num_queries"], r["num_gallery"]) for name, r in results.items()}
    assert counts == {"official": (n_query, n), "standard": (n_query, n - n_junk),
                      "torchreid": (matchable, n - n_query - n_junk)}
    # permuting the records (features with them) changes nothing: no positional coupling
    perm = np.random.default_rng(5).permutation(n)
    shuffled = Tracklets([records.keys[i] for i in perm], records.pids[perm], records.camids[perm],
                         records.is_query[perm], records.in_gallery[perm])
    again = evaluate_all(features[perm], shuffled, metric="cosine")
    for name in PROTOCOLS:
        assert again[name]["mAP"] == pytest.approx(results[name]["mAP"], abs=1e-9)
        assert again[name]["num_queries"] == results[name]["num_queries"]


def test_report_table_and_json(hand_case):
    records, dist = hand_case
    results = {name: evaluate_protocol(dist, records, name) for name in PROTOCOLS}
    table = format_table(results).splitlines()
    assert table[0].split() == ["protocol", "rank-1", "rank-5", "rank-10", "rank-20", "mAP", "#queries", "#gallery"]
    assert table[1].split() == ["official", "40.00", "80.00", "80.00", "80.00", "49.08", "5", "12"]
    assert table[3].split()[0] == "torchreid" and table[3].split()[-2:] == ["2", "6"]
    logged = json.loads(json.dumps(scalar_metrics(results)))
    assert set(logged) == set(PROTOCOLS) and "cmc" not in logged["official"]


def test_protocol_with_no_scored_query_reports_nan():
    # the only match of each query is the other query: torchreid scores nothing, and says so
    records = make_records([(1, 1, True, True), (1, 2, True, True), (2, 3, False, True)])
    r = torchreid(np.zeros((2, 3), np.float32), records)
    assert r["num_queries"] == 0 and np.isnan(r["mAP"]) and np.isnan(r["rank1"])

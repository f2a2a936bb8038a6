"""The protocols of iLIDS-VID / PRID-2011 (cross_camera) and LS-VID (sinet, bicnet): hand-worked numbers, and the
same numbers as the evaluation loops of SINet (utils/eval_metrics.py) and TF-CLIP (utils/metrics.py eval_func),
restated here as plain loops over the gallery each code builds."""

from __future__ import annotations

from fractions import Fraction as Fr

import numpy as np
import pytest

from stenvan.evaluation import Tracklets, evaluate_protocol, protocols_for, selection_protocol


def records(rows):
    """rows: (pid, camid, is_query, in_gallery)."""
    pids, cams, q, g = zip(*rows)
    return Tracklets([f"t{i}" for i in range(len(rows))], np.array(pids), np.array(cams), np.array(q), np.array(g))


# LS-VID-like test set: every tracklet in the gallery as shipped, queries marked, one junk (-1).
LS_ROWS = [
    (1, 1, True, True),   # 0 query A
    (1, 2, False, True),  # 1 A's match in another camera
    (1, 1, False, True),  # 2 same id, same camera: junk for A
    (2, 3, True, True),   # 3 query B
    (2, 3, True, True),   # 4 query C: B's twin in the same camera; neither has a cross-camera match
    (3, 4, False, True),  # 5 distractor-like other identity
    (-1, 2, False, True),  # 6 junk
    (1, 3, True, True),   # 7 query D: identity 1 in camera 3, matches 0 (a query, camera 1), 1 and 2
]
LS_DIST = {  # query record -> distances to the records it ranks (others far away)
    0: {6: 0.0, 2: 0.1, 5: 0.2, 1: 0.3, 7: 0.4},
    3: {4: 0.0, 5: 0.1},
    4: {3: 0.0, 5: 0.1},
    7: {0: 0.0, 5: 0.1, 1: 0.2, 2: 0.3},
}
# sinet (gallery = 1, 2, 5: queries and junk out). A: 2 junk -> 5w 1G: AP 1/2, first hit rank 2.
#   B, C: no cross-camera match -> skipped. D: 5w 1G 2G -> AP (1/2 + 2/3)/2 = 7/12, first hit rank 2.
# bicnet (gallery = every test tracklet but the junk: 0, 1, 2, 3, 4, 5, 7). A: 2 junk (same camera), 0 itself junk ->
#   5w 1G 7G -> AP (1/2 + 2/3)/2 = 7/12, first hit rank 2. B, C: only their twin (same camera: junk) -> skipped.
#   D: 0G 5w 1G 2G -> AP (1 + 2/3 + 3/4)/3 = 29/36, first hit rank 1.
EXPECTED = {"sinet": dict(mAP=(Fr(1, 2) + Fr(7, 12)) / 2, rank1=Fr(0), num_queries=2, num_gallery=3),
            "bicnet": dict(mAP=(Fr(7, 12) + Fr(29, 36)) / 2, rank1=Fr(1, 2), num_queries=2, num_gallery=7)}


def dist_matrix(recs, table, far=10.0):
    dist = np.full((int(recs.is_query.sum()), len(recs)), far)
    for row, q in enumerate(recs.query_indices):
        for j, d in table[q].items():
            dist[row, j] = d
        dist[row, q] = 0.0  # a query is nearest to itself (junk in bicnet, out of sinet's gallery)
    return dist


@pytest.mark.parametrize("name", ["sinet", "bicnet"])
def test_lsvid_protocols_by_hand(name):
    recs = records(LS_ROWS)
    got, want = evaluate_protocol(dist_matrix(recs, LS_DIST), recs, name), EXPECTED[name]
    assert got["mAP"] == pytest.approx(float(want["mAP"]), abs=1e-12)
    assert got["rank1"] == pytest.approx(float(want["rank1"]))
    assert (got["num_queries"], got["num_gallery"]) == (want["num_queries"], want["num_gallery"])


def reference(dist, recs, gallery_rows):
    """The loop both codes run over their gallery: sort by distance, drop same id + same camera, skip a query
    without a match, AP = mean precision at each hit, CMC from the first hit."""
    aps, firsts = [], []
    for row, q in enumerate(recs.query_indices):
        order = [j for j in sorted(gallery_rows, key=lambda j: dist[row, j])
                 if not (recs.pids[j] == recs.pids[q] and recs.camids[j] == recs.camids[q])]
        hits = [k for k, j in enumerate(order, start=1) if recs.pids[j] == recs.pids[q]]
        if not hits:
            continue
        aps.append(np.mean([(i + 1) / k for i, k in enumerate(hits)]))
        firsts.append(hits[0])
    return float(np.mean(aps)), float(np.mean(np.array(firsts) == 1)), len(aps)


def test_sinet_and_bicnet_equal_their_codes_on_random_data():
    rng = np.random.default_rng(0)
    n = 300
    pids = rng.integers(1, 40, n)
    pids[rng.random(n) < 0.05] = -1
    cams = rng.integers(1, 16, n)
    is_query = (rng.random(n) < 0.3) & (pids > 0)
    recs = Tracklets([f"t{i}" for i in range(n)], pids, cams, is_query, np.ones(n, bool))
    dist = rng.random((int(is_query.sum()), n))
    real = [j for j in range(n) if pids[j] != -1]
    # SINet: gallery = test tracklets not in query_IDX (its LS-VID loader drops -1 tracklets)
    sinet = reference(dist, recs, [j for j in real if not is_query[j]])
    # BiCnet-TKS / TF-CLIP: gallery = queries + the rest, i.e. every (identity) test tracklet
    bicnet = reference(dist, recs, real)
    for name, (m_ap, rank1, scored) in (("sinet", sinet), ("bicnet", bicnet)):
        got = evaluate_protocol(dist, recs, name)
        assert got["mAP"] == pytest.approx(m_ap, abs=1e-12) and got["rank1"] == pytest.approx(rank1)
        assert got["num_queries"] == scored
    assert sinet != bicnet  # not vacuous: the two galleries give other numbers


def test_cross_camera_each_query_against_the_other_camera():
    # two test persons: queries in camera 1, gallery in camera 2 (query records are not in the gallery)
    recs = records([(2, 1, True, False), (13, 1, True, False), (2, 2, False, True), (13, 2, False, True)])
    dist = np.array([[0.0, 0.0, 0.5, 0.2], [0.0, 0.0, 0.1, 0.3]])
    got = evaluate_protocol(dist, recs, "cross_camera")
    assert got["rank1"] == 0.0 and got["rank5"] == 1.0 and got["mAP"] == pytest.approx(0.5)
    assert (got["num_queries"], got["num_gallery"]) == (2, 2)


def test_each_dataset_names_its_protocols():
    assert protocols_for("mars") == ("official", "standard", "torchreid") == protocols_for("dukev")
    assert protocols_for("ilidsvid") == ("cross_camera",) == protocols_for("prid2011")
    assert protocols_for("lsvid") == ("sinet", "bicnet") and protocols_for("lsvid", "val") == ("bicnet",)
    assert selection_protocol("mars") == "standard" and selection_protocol("lsvid") == "sinet"

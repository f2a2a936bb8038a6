"""The evaluation protocols: design §5's three (MARS, DukeV) and those of iLIDS-VID, PRID-2011 and LS-VID, as pure
functions of (distance matrix, Tracklets). `protocols_for(dataset, split)` names those a dataset reports.

| name      | gallery                                    | queries scored         | AP                |
|-----------|--------------------------------------------|------------------------|-------------------|
| official  | in_gallery (MARS: all 12,180; −1 as junk)  | all                    | trapezoid (MATLAB)|
| standard  | in_gallery minus label −1 (MARS: 11,310)   | all                    | non-interpolated  |
| torchreid | in_gallery minus −1 minus queries (9,330)  | with a cross-cam match | non-interpolated  |

iLIDS-VID, PRID-2011: `cross_camera`: the queries (camera 1 of a person split's test persons) against the gallery
(their camera 2); each query has exactly one true match; non-interpolated AP (torchreid's eval_func).
LS-VID, reported side by side (SINet's code vs BiCnet-TKS's and TF-CLIP's): `sinet`, gallery = test tracklets minus
the queries; `bicnet`, gallery = every test tracklet, queries included. Both: junk −1 out, queries without a match
skipped (as both codes do), non-interpolated AP. LS-VID's val set (every tracklet queries all): `bicnet`'s rule.

Shared rules. Junk for a query = gallery items with label −1 plus items with the query's id *and* camera
(this includes the query itself when it is in the gallery); junk is skipped, it neither counts as a hit
nor pushes hits down. Good = same id, other camera. Distractors (0) are ordinary negatives.

Open points, decided here:
- Ties: the ranking is a *stable* sort on distance, so equal distances keep record order. This is what
  MATLAB's `sort(score, 'ascend')` does in the official code; torchreid's `np.argsort` (quicksort) is not
  deterministic on ties, so on exact ties our torchreid numbers may differ from its code (never in expectation).
- A query without any good match in its protocol's gallery: `official` and `standard` score it with
  AP = 0 and no CMC hit (it still counts in num_queries); `torchreid` skips it. (The MATLAB code would give
  AP = NaN, 0/0, and so a NaN mAP; MARS never triggers that since every query id spans two cameras.)
- AP, for a query with G good items whose k-th hit sits at rank r_k among the non-junk items:
  non-interpolated = (1/G) Σ_k k/r_k (sklearn average_precision, torchreid eval_func);
  trapezoid = (1/G) Σ_k (p_{r_k−1} + k/r_k)/2, with p_{r−1} the precision at the previous non-junk rank and
  p_0 = 1. This is liangzheng06/MARS-evaluation `utils/compute_AP.m` (also Market-1501's), which adds
  (recall − old_recall)·(old_precision + precision)/2 at every non-junk rank with old_precision starting at 1.
- If a protocol scores no query at all (no queries; its gallery is empty; torchreid: no query has a cross-camera
  match), its metrics are NaN, never a silent 0, and `note` says why; `scalar_metrics` (what goes into JSON)
  turns them into null, as JSON has no NaN. An evaluation without any gallery tracklet is refused.

Distance matrix convention: dist has shape (#queries, #records); row r is the query
`records.query_indices[r]` (records in order), column j is record j. Columns outside a protocol's gallery
are ignored, so one matrix serves all three protocols.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np

from stenvan.evaluation.distance import Metric, pairwise_distance
from stenvan.evaluation.records import JUNK_PID, Tracklets

ProtocolName = Literal["official", "standard", "torchreid", "cross_camera", "sinet", "bicnet"]
RANKS = (1, 5, 10, 20)  # the rank-k columns every report carries
_QUERY_CHUNK = 256  # queries ranked per step: bounds the (chunk × #records) boolean masks to a few MB


@dataclass(frozen=True)
class Protocol:
    ap_rule: Literal["trapezoid", "non_interpolated"]
    drop_junk_label: bool  # take label −1 out of the gallery (official keeps it, as junk)
    drop_queries: bool  # take query tracklets out of the gallery (torchreid's MARS split)
    skip_unmatched: bool  # score only queries with >= 1 good match in the gallery


PROTOCOLS: dict[str, Protocol] = {
    "official": Protocol("trapezoid", drop_junk_label=False, drop_queries=False, skip_unmatched=False),
    "standard": Protocol("non_interpolated", drop_junk_label=True, drop_queries=False, skip_unmatched=False),
    "torchreid": Protocol("non_interpolated", drop_junk_label=True, drop_queries=True, skip_unmatched=True),
}  # design §5's three (MARS, DukeV); the other datasets' protocols below
OTHER_PROTOCOLS: dict[str, Protocol] = {
    "cross_camera": Protocol("non_interpolated", drop_junk_label=True, drop_queries=True, skip_unmatched=False),
    "sinet": Protocol("non_interpolated", drop_junk_label=True, drop_queries=True, skip_unmatched=True),
    "bicnet": Protocol("non_interpolated", drop_junk_label=True, drop_queries=False, skip_unmatched=True),
}
ALL_PROTOCOLS = {**PROTOCOLS, **OTHER_PROTOCOLS}
MARS_PROTOCOLS = tuple(PROTOCOLS)
# The protocols each dataset reports, in report order (the first one's ranking is drawn in ranked_list.png).
DATASET_PROTOCOLS = {"mars": MARS_PROTOCOLS, "dukev": MARS_PROTOCOLS, "ilidsvid": ("cross_camera",),
                     "prid2011": ("cross_camera",), "lsvid": ("sinet", "bicnet"), "lsvid/val": ("bicnet",)}


def protocols_for(dataset: str, split=None) -> tuple[str, ...]:
    """The protocols reported for `dataset` (and for LS-VID's val set: split "val"), in report order."""
    return DATASET_PROTOCOLS[f"{dataset}/val" if split == "val" else dataset]


def selection_protocol(dataset: str, split=None) -> str:
    """The protocol whose mAP selects models (best.pt): standard on MARS and DukeV, else the dataset's first."""
    return "standard" if dataset in ("mars", "dukev") else protocols_for(dataset, split)[0]


def _protocol(name: str) -> Protocol:
    if name not in ALL_PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(ALL_PROTOCOLS)}")
    return ALL_PROTOCOLS[name]


def gallery_mask(records: Tracklets, name: ProtocolName) -> np.ndarray:
    """(N,) bool: which records form this protocol's gallery."""
    p = _protocol(name)
    mask = records.in_gallery.copy()
    if p.drop_junk_label:
        mask &= records.pids != JUNK_PID
    if p.drop_queries:
        mask &= ~records.is_query
    return mask


def _good_and_junk(records: Tracklets, rows: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks (len(rows), N) for the queries at record indices `rows`: good matches and junk items."""
    same_id = records.pids[rows, None] == records.pids[None, :]
    same_cam = records.camids[rows, None] == records.camids[None, :]
    good = same_id & ~same_cam & gallery
    junk = ((same_id & same_cam) | (records.pids == JUNK_PID)) & gallery
    return good, junk


def _check_dist(dist: np.ndarray, records: Tracklets) -> np.ndarray:
    dist = np.asarray(dist)
    expected = (int(records.is_query.sum()), len(records))
    if dist.shape != expected:
        raise ValueError(f"dist has shape {dist.shape}, expected (#queries, #records) = {expected}")
    if not np.isfinite(dist).all():
        raise ValueError("dist contains NaN or inf: the ranking would be meaningless")
    return dist


def _score_chunk(dist, good, ignore, ap_rule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank each row; return (first-hit rank, 1-based, 0 = none), AP and #good per row."""
    order = np.argsort(dist, axis=1, kind="stable")  # stable: ties keep record order
    good_s = np.take_along_axis(good, order, axis=1)  # (c, N) in ranked order
    kept_s = ~np.take_along_axis(ignore, order, axis=1)
    rank = np.cumsum(kept_s, axis=1, dtype=np.int32)  # rank among non-ignored items (valid where kept)
    hits = np.cumsum(good_s, axis=1, dtype=np.int32)  # hits so far (int32: numpy's fast path)
    n_good = hits[:, -1]

    row, col = np.nonzero(good_s)  # every hit, row-major so hits of a row are in rank order
    r, k = rank[row, col].astype(np.float64), hits[row, col].astype(np.float64)
    precision = k / r
    if ap_rule == "trapezoid":
        # precision at the previous non-junk rank, 1.0 before the first rank (old_precision = 1.0)
        prev = np.where(r > 1, (k - 1) / np.maximum(r - 1, 1), 1.0)
        precision = (prev + precision) / 2
    ap = np.bincount(row, weights=precision, minlength=len(dist)) / np.maximum(n_good, 1)

    first = np.zeros(len(dist), dtype=np.int64)
    has = n_good > 0
    first[has] = rank[has, np.argmax(good_s[has], axis=1)]
    return first, ap, n_good


def evaluate_protocol(dist: np.ndarray, records: Tracklets, name: ProtocolName) -> dict:
    """Scores one protocol: rank1/5/10/20 and mAP (fractions), num_queries (scored), num_gallery, cmc.

    `cmc` is a float64 array of length num_gallery: cmc[k-1] = fraction of scored queries whose first
    good match is within the top k (junk skipped). It is for plots; drop it before logging to JSON.
    """
    p = _protocol(name)
    dist = _check_dist(dist, records)
    gallery = gallery_mask(records, name)
    query_rows = records.query_indices
    chunks = []
    for start in range(0, len(query_rows), _QUERY_CHUNK):
        rows = query_rows[start : start + _QUERY_CHUNK]
        good, junk = _good_and_junk(records, rows, gallery)
        chunks.append(_score_chunk(dist[start : start + len(rows)], good, junk | ~gallery, p.ap_rule))
    first, ap, n_good = (np.concatenate(parts) for parts in zip(*chunks))

    scored = n_good > 0 if p.skip_unmatched else np.ones(len(first), dtype=bool)
    result = _summarise(first[scored], ap[scored], num_gallery=int(gallery.sum()))
    if not result["num_queries"] or not result["num_gallery"]:
        result = {**_summarise(first[:0], ap[:0], int(gallery.sum())), "note": _why_nothing(records, gallery, p)}
    return result


def _why_nothing(records: Tracklets, gallery: np.ndarray, p: Protocol) -> str:
    """Why a protocol scored no query (its metrics are then NaN, null in JSON)."""
    if not records.is_query.any():
        return "nothing to score: there are no queries"
    if not gallery.any():
        dropped = " and the queries" if p.drop_queries else ""
        return f"nothing to score: its gallery is empty once junk (label -1){dropped} are left out"
    return "nothing to score: no query has a match from another camera in its gallery"


def _summarise(first: np.ndarray, ap: np.ndarray, num_gallery: int) -> dict:
    num = len(first)
    hit_ranks = first[first > 0]
    if num == 0:
        cmc = np.full(num_gallery, np.nan)
    else:
        cmc = np.cumsum(np.bincount(hit_ranks, minlength=num_gallery + 1)[1:]) / num
    result = {f"rank{k}": float(np.mean((first > 0) & (first <= k))) if num else float("nan") for k in RANKS}
    result["mAP"] = float(ap.mean()) if num else float("nan")
    result.update(num_queries=num, num_gallery=num_gallery, cmc=cmc)
    return result


def official(dist: np.ndarray, records: Tracklets) -> dict:
    """MARS MATLAB evaluation (the STE-NVAN paper's numbers): see the module docstring."""
    return evaluate_protocol(dist, records, "official")


def standard(dist: np.ndarray, records: Tracklets) -> dict:
    """AP3D/TCLNet/PSTA tables: junk-labelled tracklets dropped, queries kept, every query scored."""
    return evaluate_protocol(dist, records, "standard")


def torchreid(dist: np.ndarray, records: Tracklets) -> dict:
    """torchreid's MARS split and eval_func: queries out of the gallery, unmatched queries skipped."""
    return evaluate_protocol(dist, records, "torchreid")


def query_distances(features, records: Tracklets, metric: Metric = "cosine") -> np.ndarray:
    """The (#queries, #records) matrix all protocols take; features row i belongs to records record i."""
    if len(features) != len(records):
        raise ValueError(f"{len(features)} feature rows for {len(records)} tracklet records")
    return pairwise_distance(features[records.query_indices], features, metric=metric)


def evaluate_all(features, records: Tracklets, metric: Metric = "cosine",
                 names: tuple[str, ...] = MARS_PROTOCOLS) -> dict[str, dict]:
    """{name: {...}} for each protocol of `names` (default MARS's official, standard, torchreid), from one distance
    matrix. ValueError without any gallery tracklet: every query would score 0, which is no evaluation."""
    if not np.asarray(records.in_gallery).any():
        raise ValueError("no gallery tracklets: there is nothing to rank the queries against")
    dist = query_distances(features, records, metric)
    return {name: evaluate_protocol(dist, records, name) for name in names}


def top_k_matches(dist: np.ndarray, records: Tracklets, name: ProtocolName = "official", k: int = 10):
    """Top-k gallery records per query (junk included, so it can be shown) with their status.

    Returns (indices, statuses): (#queries, k') record indices and matching strings "correct" / "wrong" /
    "junk", where k' = min(k, gallery size). Feeds plots.plot_ranked_list.
    """
    dist = _check_dist(dist, records)
    gallery = gallery_mask(records, name)
    columns = np.flatnonzero(gallery)
    k = min(k, len(columns))
    order = columns[np.argsort(dist[:, columns], axis=1, kind="stable")[:, :k]]  # (Q, k) record indices
    good, junk = _good_and_junk(records, records.query_indices, gallery)
    good, junk = np.take_along_axis(good, order, 1), np.take_along_axis(junk, order, 1)
    statuses = np.where(good, "correct", np.where(junk, "junk", "wrong"))
    return order, statuses


def scalar_metrics(results: dict[str, dict]) -> dict[str, dict]:
    """evaluate_all's output without the CMC arrays, NaN (a protocol with nothing to score, see its `note`) as
    None: what goes into JSON (metrics.json, --summary), which has no NaN."""
    def plain(v):
        return None if isinstance(v, float) and np.isnan(v) else v

    return {name: {k: plain(v) for k, v in r.items() if k != "cmc"} for name, r in results.items()}


def format_table(results: dict[str, dict]) -> str:
    """One row per protocol (or re-ranked protocol), percentages with two decimals, e.g. for the end of eval.py."""
    width = max([10] + [len(name) + 1 for name in results])  # "torchreid_rerank" is longer than "protocol"
    header = f"{'protocol':<{width}}" + "".join(f"{f'rank-{k}':>9}" for k in RANKS) + \
        f"{'mAP':>9}{'#queries':>10}{'#gallery':>10}"
    lines, notes = [header], []

    def cell(v) -> str:
        return f"{'n/a':>9}" if v is None or np.isnan(v) else f"{100 * v:>9.2f}"

    for name, r in results.items():
        cells = "".join(cell(r[f"rank{k}"]) for k in RANKS)
        lines.append(f"{name:<{width}}{cells}{cell(r['mAP'])}{r['num_queries']:>10d}{r['num_gallery']:>10d}")
        if r.get("note"):
            notes.append(f"{name}: {r['note']}")
    return "\n".join(lines + notes)

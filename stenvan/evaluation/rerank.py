"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
CVPR 2017), exact, in float32 on the CPU, for MARS-size problems (≈ 14k tracklets).

Conventions are those of the authors' Python reference (zhunzhong07/person-re-ranking), which torchreid
(`torchreid/utils/rerank.py`) and fast-reid copy, so that numbers compare with theirs:
- Inputs are the query–gallery, query–query and gallery–gallery matrices of the retrieval distance (ours:
  1 − cos by default); the output is the re-ranked query–gallery matrix. Queries and gallery together are the
  N = Nq + Ng nodes of the neighbour graph.
- Original distance: the N×N matrix M is squared and each column divided by its maximum, then transposed:
  d(i, j) = M[j, i]² / max_k M[k, i]² (= row-wise normalisation when M is symmetric).
- Neighbours of i: the first k of i's row of d in ascending order, i itself included (usually first). Ties go
  to the lower index (a stable sort; the reference's np.argsort leaves ties unspecified).
- R(i, k1) = {j among i's k1+1 nearest : i among j's k1+1 nearest} (k-reciprocal neighbours). For each
  c in R(i, k1), R(c, round(k1/2)) is added when more than 2/3 of it lies in R(i, k1).
- V[i, j] = exp(−d(i, j)) / Σ over i's expanded set, 0 outside it (each row sums to 1).
- Local query expansion (k2 > 1): V[i] ← mean of V over i's k2 nearest (i included).
- Jaccard distance J(i, j) = 1 − Σ_k min(V[i,k], V[j,k]) / (2 − Σ_k min(V[i,k], V[j,k])) (rows sum to 1,
  so the denominator is Σ_k max); final = (1 − λ)·J + λ·d, query rows, gallery columns.

Where this differs from the reference is only how, never what: neighbour lists come from a partial sort (top
max(k1+1, k2) per row instead of N log N full sorts), V is a sparse matrix (rows hold a few dozen entries, the
reference keeps two dense N×N float32 copies), and the Jaccard sums run over V's sparse columns. Memory is one
dense N×N float32 matrix (d) plus O(N·k1) — measured figures are in docs/evaluation.md (Re-ranking).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from stenvan.evaluation.distance import Metric, pairwise_distance
from stenvan.evaluation.protocols import ProtocolName, gallery_mask
from stenvan.evaluation.records import Tracklets

K1, K2, LAMBDA = 20, 6, 0.3  # the paper's parameters
_ROWS = 1024  # rows per chunk of the neighbour search: bounds its temporaries to a few times 1024 × N floats


def re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int = K1, k2: int = K2,
               lambda_value: float = LAMBDA) -> np.ndarray:
    """Re-ranked query–gallery distances (Nq, Ng) float32 from (Nq, Ng), (Nq, Nq), (Ng, Ng) distances."""
    q_g, q_q, g_g = (np.asarray(m, dtype=np.float32) for m in (q_g_dist, q_q_dist, g_g_dist))
    nq, ng = q_g.shape if q_g.ndim == 2 else (-1, -1)
    if q_g.ndim != 2 or q_q.shape != (nq, nq) or g_g.shape != (ng, ng):
        raise ValueError(f"expected (Nq, Ng), (Nq, Nq), (Ng, Ng) distances, got {q_g.shape}, {q_q.shape}, "
                         f"{g_g.shape}")
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"need k1 >= 1, k2 >= 1 and 0 <= lambda <= 1, got k1={k1}, k2={k2}, "
                         f"lambda={lambda_value}")
    for name, m in (("q_g", q_g), ("q_q", q_q), ("g_g", g_g)):
        if not np.isfinite(m).all():
            raise ValueError(f"{name} distances contain NaN or inf")
    n = nq + ng

    # d = the reference's normalised original distance (its (M² / column max)ᵀ), built transposed directly.
    d = np.empty((n, n), dtype=np.float32)  # (N, N): the one dense matrix
    d[:nq, :nq], d[:nq, nq:], d[nq:, :nq], d[nq:, nq:] = q_q.T, q_g, q_g.T, g_g.T
    np.square(d, out=d)
    row_max = d.max(axis=1, keepdims=True)  # = the column maxima of M²
    d /= np.where(row_max > 0, row_max, 1)  # all-zero rows (identical features) stay 0 instead of NaN

    # List lengths as the reference slices them (k1+1, round(k1/2)+1 half to even, k2), at most N each.
    n_fwd, n_half, n_qe = min(k1 + 1, n), min(int(np.around(k1 / 2.0)) + 1, n), min(k2, n)
    nearest = _nearest(d, max(n_fwd, n_qe))  # (N, K) node indices, nearest first
    forward = nearest[:, :n_fwd]  # (N, k1+1)
    recip = _reciprocal(forward)  # (N, k1+1) bool: forward[i, m] is a k1-reciprocal neighbour of i
    half_fwd = nearest[:, :n_half]  # (N, k1/2+1)
    half_recip = _reciprocal(half_fwd)

    v = _encode(d, forward, recip, half_fwd, half_recip)  # (N, N) sparse, rows sum to 1
    if k2 != 1:  # local query expansion: V[i] <- mean of V over i's k2 nearest
        rows = np.repeat(np.arange(n), n_qe)
        expand = sp.csr_matrix((np.full(n * n_qe, 1.0 / n_qe, dtype=np.float32),
                                (rows, nearest[:, :n_qe].ravel())), shape=(n, n))
        v = (expand @ v).tocsr()
    return _final_distances(d, v, nq, lambda_value)


def _nearest(d: np.ndarray, k: int) -> np.ndarray:
    """(N, k) int64: each row's k smallest entries, ascending, ties by index (a stable argsort's first k)."""
    n = d.shape[0]
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, _ROWS):
        block = d[start : start + _ROWS]  # (c, N)
        kth = np.partition(block, k - 1, axis=1)[:, k - 1 : k]  # (c, 1): the k-th smallest value of each row
        rows, cols = np.nonzero(block <= kth)  # every candidate (ties at the k-th value included), row-major
        order = np.lexsort((cols, block[rows, cols], rows))  # by row, then value, then index
        rows, cols = rows[order], cols[order]
        first = np.searchsorted(rows, np.arange(len(block)))  # where each row's candidates start
        out[start : start + len(block)] = cols[first[:, None] + np.arange(k)]
    return out


def _reciprocal(forward: np.ndarray) -> np.ndarray:
    """(N, k) bool: j = forward[i, m] is reciprocal when i is among j's k nearest (forward[j])."""
    n = len(forward)
    out = np.empty(forward.shape, dtype=bool)
    for start in range(0, n, 4 * _ROWS):
        f = forward[start : start + 4 * _ROWS]  # (c, k)
        back = forward[f]  # (c, k, k): the neighbour lists of i's neighbours
        out[start : start + len(f)] = (back == np.arange(start, start + len(f))[:, None, None]).any(axis=2)
    return out


def _encode(d, forward, recip, half_fwd, half_recip) -> sp.csr_matrix:
    """V (N, N) float32 sparse: Gaussian weights over each node's expanded k-reciprocal set."""
    n, k = forward.shape
    half_size = half_recip.sum(axis=1)  # |R(c, k1/2)| per node
    own = np.where(recip, forward, -1)  # (N, k): R(i, k1), -1 where not reciprocal
    pair_rows, pair_cols = [np.repeat(np.arange(n), k)[recip.ravel()]], [forward[recip]]
    for start in range(0, n, _ROWS):
        cand = forward[start : start + _ROWS]  # (c, k) candidates c of each i
        cand_set = np.where(half_recip[cand], half_fwd[cand], -2)  # (c, k, h): R(cand, k1/2), -2 = none
        # |R(c, k1/2) ∩ R(i, k1)|: members of the candidate's set found in i's reciprocal list
        inside = (cand_set[:, :, :, None] == own[start : start + _ROWS, None, None, :]).any(axis=3).sum(axis=2)
        accept = recip[start : start + _ROWS] & (inside > 2.0 / 3 * half_size[cand])  # the reference's test
        i, m = np.nonzero(accept)
        members = cand_set[i, m]  # (#accepted, h)
        keep = members >= 0
        pair_rows.append(np.repeat(start + i, members.shape[1])[keep.ravel()])
        pair_cols.append(members[keep])
    rows, cols = np.concatenate(pair_rows), np.concatenate(pair_cols)
    # The union of R(i, k1) and the accepted sets: duplicates collapse when the pairs are deduplicated.
    pairs = np.unique(rows * n + cols)
    rows, cols = pairs // n, pairs % n
    weight = np.exp(-d[rows, cols])  # float32
    total = np.bincount(rows, weights=weight, minlength=n)
    data = (weight / total[rows]).astype(np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(n, n))


def _final_distances(d: np.ndarray, v: sp.csr_matrix, nq: int, lambda_value: float) -> np.ndarray:
    """(1 − λ)·Jaccard + λ·d for query rows and gallery columns; Σ min over V's sparse columns."""
    n = d.shape[0]
    cols = v.tocsc()
    out = np.empty((nq, n - nq), dtype=np.float32)
    for i in range(nq):
        ks, vals = v.indices[v.indptr[i] : v.indptr[i + 1]], v.data[v.indptr[i] : v.indptr[i + 1]]
        starts, lengths = cols.indptr[ks], np.diff(cols.indptr)[ks]
        # positions of every stored entry of the columns ks in the CSC arrays, column by column
        at = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        shared = np.minimum(cols.data[at], np.repeat(vals, lengths))  # min(V[j,k], V[i,k])
        min_sum = np.bincount(cols.indices[at], weights=shared, minlength=n).astype(np.float32)  # (N,)
        jaccard = 1 - min_sum / (2 - min_sum)
        out[i] = jaccard[nq:] * (1 - lambda_value) + d[i, nq:] * lambda_value
    return out


def rerank_distances(features: np.ndarray, records: Tracklets, protocol: ProtocolName, metric: Metric = "cosine",
                     k1: int = K1, k2: int = K2, lambda_value: float = LAMBDA) -> np.ndarray:
    """The (#queries, #records) matrix the protocols take, re-ranked within `protocol`'s gallery.

    Each protocol has its own gallery, hence its own neighbour graph (as torchreid re-ranks its own gallery).
    Columns outside the gallery are ignored by the protocol; they hold the largest float32.
    """
    if len(features) != len(records):
        raise ValueError(f"{len(features)} feature rows for {len(records)} tracklet records")
    gallery = np.flatnonzero(gallery_mask(records, protocol))
    q_feats, g_feats = features[records.query_indices], features[gallery]
    reranked = re_ranking(pairwise_distance(q_feats, g_feats, metric), pairwise_distance(q_feats, q_feats, metric),
                          pairwise_distance(g_feats, g_feats, metric), k1, k2, lambda_value)
    out = np.full((len(q_feats), len(records)), np.finfo(np.float32).max, dtype=np.float32)
    out[:, gallery] = reranked
    return out

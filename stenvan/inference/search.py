"""Search a gallery of tracklets for query tracklets: the top k per query, in chunks on the device.

    idx, dist = top_k(query_feats, gallery_feats, k=10, metric="cosine", device=torch.device("cuda"))

Memory: the gallery features live on the device once (N_g × 2048 × 4 B: 781 MiB for 100,000 tracklets) and
the distances of one chunk of queries at a time (`max_block_floats` = 2^26 floats = 256 MiB by default); only
the k best of each row leave the device. The whole query × gallery matrix is never built, so the gallery size
is bounded by the device's memory for its features, not by N_q × N_g. Re-ranking (`reranked_top_k`) needs the
full (N_q + N_g)² matrix on the host instead (stenvan.evaluation.rerank): for small galleries only.
Ties (equal distances) keep gallery order, as eval's stable ranking does.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

import numpy as np
import torch

from stenvan.evaluation.distance import distance_blocks, pairwise_distance
from stenvan.evaluation.plots import plot_ranked_list
from stenvan.shards import atomic_write

BLOCK_FLOATS = 2 ** 26  # distances held on the device at once (256 MiB of float32)
SEARCH_OUTPUTS = ("ranking.csv", "query.npz", "gallery.npz", "ranked")  # what a search writes into its folder
KEY_CHARS_IN_NAME = 180  # a picture's name stays far below a file name's 255 bytes, with room for its temp name


def top_k(query_feats, gallery_feats, k: int, metric: str = "cosine", device: torch.device | None = None,
          max_block_floats: int = BLOCK_FLOATS, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N_q, k') int64, distances (N_q, k') float32) of each query's nearest gallery rows, nearest first;
    k' = min(k, N_g). Distances are eval's (stenvan.evaluation.distance).

    labels = (query pids, query camids, gallery pids, gallery camids) drops junk (same identity and camera, or
    label -1) as the protocols do: such entries get distance inf and rank last.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = torch.as_tensor(np.asarray(query_feats, dtype=np.float32))
    g = torch.as_tensor(np.asarray(gallery_feats, dtype=np.float32))
    if device is not None:
        q = q.to(device)  # the gallery follows the queries' device (distance_blocks)
    if labels is not None:
        qp, qc, gp, gc = (torch.as_tensor(np.asarray(a, dtype=np.int64), device=q.device) for a in labels)
    k = min(k, g.shape[0])
    chunk = max(1, max_block_floats // max(g.shape[0], 1))
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    dist = np.empty((q.shape[0], k), dtype=np.float32)
    for start, d in distance_blocks(q, g, metric, chunk_size=chunk):  # d: (c, N_g) on the device
        if labels is not None:
            rows = slice(start, start + d.shape[0])
            junk = ((qp[rows, None] == gp[None]) & (qc[rows, None] == gc[None])) | (gp == -1)[None]
            d = d.masked_fill(junk, float("inf"))
        i, v = _smallest(d, k)
        idx[start : start + len(i)], dist[start : start + len(i)] = i.cpu().numpy(), v.cpu().numpy()
    return idx, dist


def _smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k smallest entries, ascending, ties by column: a stable argsort's first k, without sorting N_g."""
    kth = torch.topk(d, k, dim=1, largest=False).values.amax(dim=1, keepdim=True)  # (c, 1) the k-th smallest
    rows, cols = torch.nonzero(d <= kth, as_tuple=True)  # row-major, columns ascending within a row
    vals = d[rows, cols]
    order = torch.sort(vals, stable=True).indices  # by value, ties keep column order ...
    order = order[torch.sort(rows[order], stable=True).indices]  # ... then by row
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = torch.bincount(rows, minlength=d.shape[0])  # >= k per row
    take = (torch.cumsum(counts, 0) - counts)[:, None] + torch.arange(k, device=d.device)  # (c, k)
    return cols[take], vals[take]


def reranked_top_k(query_feats, gallery_feats, k: int, metric: str = "cosine", device=None, labels=None,
                   k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """top_k on k-reciprocal re-ranked distances (exact, on the host: about 12·(N_q + N_g)² bytes at peak);
    also returns the plain distances of the same matches."""
    from stenvan.evaluation.rerank import re_ranking

    n = len(query_feats) + len(gallery_feats)
    need = 12 * n * n
    free = _available_memory()
    if need > free:
        raise MemoryError(f"re-ranking {n:,} tracklets needs about {need / 2**30:.1f} GiB of memory, "
                          f"{free / 2**30:.1f} GiB are free; search without --rerank or with a smaller gallery")
    q = torch.as_tensor(np.asarray(query_feats, dtype=np.float32))
    g = torch.as_tensor(np.asarray(gallery_feats, dtype=np.float32))
    if device is not None:
        q, g = q.to(device), g.to(device)
    plain = pairwise_distance(q, g, metric)  # (N_q, N_g)
    dist = re_ranking(plain, pairwise_distance(q, q, metric), pairwise_distance(g, g, metric), k1, k2, lambda_value)
    if labels is not None:
        qp, qc, gp, gc = (np.asarray(a) for a in labels)
        dist[((qp[:, None] == gp[None]) & (qc[:, None] == gc[None])) | (gp == -1)[None]] = np.inf
    k = min(k, dist.shape[1])
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(dist, idx, axis=1), np.take_along_axis(plain, idx, axis=1)


def _available_memory() -> int:
    """Bytes the kernel can give without swapping (MemAvailable counts reclaimable caches; free pages do not)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def match_status(query_pid: int, query_camid: int, pids, camids) -> list[str]:
    """eval's statuses for ranked gallery items: correct (same id, other camera), junk (same id and camera, or
    label -1), wrong."""
    out = []
    for pid, camid in zip(pids, camids):
        if pid == -1 or (pid == query_pid and camid == query_camid):
            out.append("junk")
        else:
            out.append("correct" if pid == query_pid else "wrong")
    return out


def write_ranking(path: str | os.PathLike, query_keys, gallery_keys, idx: np.ndarray, dist: np.ndarray,
                  statuses=None, original=None) -> Path:
    """ranking.csv: query, rank (1-based), gallery, distance[, status][, original_distance], one row per match."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["query", "rank", "gallery", "distance"] + (["status"] if statuses is not None else [])
                    + (["original_distance"] if original is not None else []))
    for i, key in enumerate(query_keys):
        for r, (j, d) in enumerate(zip(idx[i], dist[i])):
            if not np.isfinite(d):
                break  # dropped junk ranks last: the list ends here
            row = [key, r + 1, gallery_keys[j], f"{d:.6f}"]
            row += [statuses[i][r]] if statuses is not None else []
            row += [f"{original[i][r]:.6f}"] if original is not None else []
            writer.writerow(row)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def picture_name(index: int, key: str) -> str:
    """A file name for query `index`'s picture: its number, then its key with unsafe characters replaced and cut
    to KEY_CHARS_IN_NAME (the number keeps the names apart)."""
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)[:KEY_CHARS_IN_NAME]}.png"


def write_pictures(folder: str | os.PathLike, query_keys, query_thumb, gallery_thumb, idx: np.ndarray,
                   dist: np.ndarray, statuses, count: int) -> list[Path]:
    """One ranked-list picture per query (eval's layout: the query, then its top k with rank and distance)."""
    paths = []
    for i in range(min(count, len(query_keys))):
        path = Path(folder) / picture_name(i, query_keys[i])
        n = int(np.isfinite(dist[i]).sum())  # dropped junk (inf) is not shown
        titles = [[f"{r + 1}: {d:.3f}" for r, d in enumerate(dist[i][:n])]]
        plot_ranked_list([query_thumb(i)], [[gallery_thumb(j) for j in idx[i][:n]]], [statuses[i][:n]], path,
                         query_titles=[query_keys[i]], ranked_titles=titles)
        paths.append(path)
    return paths

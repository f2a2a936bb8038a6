"""Query-by-gallery distance matrices for retrieval, computed in torch and returned as float32 numpy.

Why numpy on the host: the protocols (protocols.py) rank with numpy, and even an all-by-all MARS matrix
(12,180² × 4 B = 593 MB) fits in host memory, whereas keeping it on a GPU beside a model would not be free.
Each chunk of queries is computed on the features' device (CPU or CUDA) and copied back as soon as it is
done, so device memory holds one chunk (chunk_size × #gallery floats) at a time. `distance_blocks` yields
the chunks on the device for callers that reduce them there (stenvan.inference.search keeps only each row's top k).
"""

from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

Metric = Literal["cosine", "euclidean"]
METRICS = ("cosine", "euclidean")


@torch.no_grad()  # on a generator, torch sets the grad mode only while the generator runs (not between yields)
def distance_blocks(
    query_feats: torch.Tensor | np.ndarray,
    gallery_feats: torch.Tensor | np.ndarray,
    metric: Metric = "cosine",
    chunk_size: int = 1024,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first query row, distances (c, num_gallery) float32 on the query's device) per chunk of c queries.

    cosine:    1 − cos(q, g), computed on L2-normalised features (range [0, 2]).
    euclidean: ‖q − g‖₂ (not squared; the ranking is the same either way).
    Inputs are (N, D) tensors or arrays; the gallery is moved to the query's device.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    q = torch.as_tensor(query_feats)
    g = torch.as_tensor(gallery_feats).to(q.device)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"expected (Nq, D) and (Ng, D) features, got {tuple(q.shape)} and {tuple(g.shape)}")

    # fp16/bf16 features (autocast) are upcast: 3 significant digits would create spurious ties.
    q, g = q.float(), g.float()
    if metric == "cosine":
        q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    else:
        # ‖q−g‖² = ‖q‖² + ‖g‖² − 2q·g cancels badly in float32 when the features share a large
        # offset; distances are translation-invariant, so centring on the gallery mean costs nothing.
        centre = g.mean(dim=0, keepdim=True)  # (1, D)
        q, g = q - centre, g - centre
        g_sq = g.pow(2).sum(dim=1)  # (Ng,)

    for start in range(0, q.shape[0], chunk_size):
        qc = q[start : start + chunk_size]  # (c, D)
        if metric == "cosine":
            d = (qc @ g.T).neg_().add_(1.0)  # (c, Ng): 1 − q·g in place (bitwise equal), one block in memory
        else:
            d = (qc.pow(2).sum(dim=1, keepdim=True) + g_sq - 2.0 * (qc @ g.T)).clamp_min_(0.0).sqrt_()
        yield start, d


def pairwise_distance(
    query_feats: torch.Tensor | np.ndarray,
    gallery_feats: torch.Tensor | np.ndarray,
    metric: Metric = "cosine",
    chunk_size: int = 1024,
) -> np.ndarray:
    """Distances (num_query, num_gallery) as a float32 numpy array; smaller = more similar (see distance_blocks)."""
    out = np.empty((len(query_feats), len(gallery_feats)), dtype=np.float32)
    for start, d in distance_blocks(query_feats, gallery_feats, metric, chunk_size):  # validates the inputs
        out[start : start + d.shape[0]] = d.cpu().numpy()  # device → host, one chunk at a time
    return out

"""PNG figures for an evaluation run: CMC curves per protocol and a ranked-list grid.

Figures are built on matplotlib's object API (Figure + Agg canvas), never pyplot: no global backend
switch, no figure registry to leak, safe in a headless worker. Files are written atomically (temp file in
the same folder, then os.replace) so a crash never leaves a half-written PNG behind a valid name.
The ranked-list plot takes plain (H, W, 3) uint8 images: the caller decides where thumbnails come from
(a shard reader, a folder, synthetic frames); `protocols.top_k_matches` gives the order and statuses.
"""

import itertools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# RGB frames; "unlabelled": a search among tracklets without identities (white, i.e. no visible frame)
STATUS_COLOURS = {"correct": (0, 170, 0), "wrong": (220, 0, 0), "junk": (140, 140, 140), "unlabelled": (255, 255, 255)}
QUERY_COLOUR = (30, 90, 220)


def _save_atomic(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    FigureCanvasAgg(fig)  # attach an Agg canvas: the figure renders without pyplot
    try:
        fig.savefig(tmp, format="png", dpi=dpi)  # format explicit: the temp name has no .png suffix
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_cmc(results: dict[str, dict], path: str | os.PathLike, max_rank: int = 50) -> Path:
    """CMC curves (rank 1..max_rank, in %) of every protocol in evaluate_all's output, into one PNG."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    # official and standard CMCs coincide on MARS (they differ only in AP): line styles keep both visible
    for (name, r), style in zip(results.items(), itertools.cycle(["-", "--", ":"])):
        cmc = np.asarray(r["cmc"])[:max_rank]
        if len(cmc) == 0 or np.isnan(cmc).all():
            continue  # a protocol that scored no query has no curve
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(ranks, 100 * cmc, linestyle=style, linewidth=1.5,
                label=f"{name}: rank-1 {100 * r['rank1']:.2f}, mAP {100 * r['mAP']:.2f} ({r['num_queries']} q)")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(1, max_rank)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("CMC")
    fig.tight_layout()
    return _save_atomic(fig, path, dpi=120)


def _framed(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """The image with a solid border, about 1/20 of its height, in `colour`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"thumbnails must be (H, W, 3) uint8 arrays, got {image.shape} {image.dtype}")
    border = max(2, image.shape[0] // 20)
    framed = np.empty((image.shape[0] + 2 * border, image.shape[1] + 2 * border, 3), dtype=np.uint8)
    framed[:] = colour
    framed[border:-border, border:-border] = image
    return framed


def plot_ranked_list(
    query_thumbs: Sequence[np.ndarray],
    ranked_thumbs: Sequence[Sequence[np.ndarray]],
    statuses: Sequence[Sequence[str]],
    path: str | os.PathLike,
    query_titles: Sequence[str] | None = None,
    ranked_titles: Sequence[Sequence[str]] | None = None,
) -> Path:
    """A grid: one row per query (blue frame), then its ranked gallery thumbnails framed by status.

    statuses[i][j] ∈ {"correct", "wrong", "junk", "unlabelled"} for ranked_thumbs[i][j] (green / red / grey /
    white). ranked_titles[i][j] replaces the rank above a thumbnail (e.g. rank and distance).
    Rows may have different lengths; thumbnails may have different sizes.
    """
    if not (len(query_thumbs) == len(ranked_thumbs) == len(statuses)) or len(query_thumbs) == 0:
        raise ValueError("need one query thumbnail, one ranked list and one status list per row (>= 1 row)")
    for thumbs, marks in zip(ranked_thumbs, statuses):
        if len(thumbs) != len(marks):
            raise ValueError(f"{len(thumbs)} ranked thumbnails but {len(marks)} statuses in a row")
        unknown = set(marks) - set(STATUS_COLOURS)
        if unknown:
            raise ValueError(f"unknown statuses {sorted(unknown)}; valid: {', '.join(STATUS_COLOURS)}")

    rows, cols = len(query_thumbs), 1 + max(len(t) for t in ranked_thumbs)
    fig = Figure(figsize=(0.9 * cols, 1.9 * rows))  # person crops are about 2:1 (h:w)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(_framed(query_thumbs[i], QUERY_COLOUR))
        axes[i, 0].set_title(query_titles[i] if query_titles else "query", fontsize=7)
        for j, (thumb, status) in enumerate(zip(ranked_thumbs[i], statuses[i]), start=1):
            axes[i, j].imshow(_framed(thumb, STATUS_COLOURS[status]))
            title = ranked_titles[i][j - 1] if ranked_titles else str(j)  # default: the rank, 1-based
            axes[i, j].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()  # also blanks the cells of shorter rows
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.08, hspace=0.15)
    return _save_atomic(fig, path, dpi=100)

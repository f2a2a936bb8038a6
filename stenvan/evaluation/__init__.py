"""Retrieval evaluation: distances, the three named protocols of design §5, and plots.

`evaluate.py` runs a model over a prepared dataset's splits and writes eval.py's outputs; the other modules are
pure functions of features and labels.
May import: the shared top-level modules, stenvan.models and stenvan.data; never training or inference.

Typical use:
    records = Tracklets(keys, pids, camids, is_query, in_gallery)   # one per feature row
    results = evaluate_all(features, records, metric="cosine")      # {"official": {...}, ...}
    print(format_table(results)); plot_cmc(results, run_dir / "cmc.png")
"""

from stenvan.evaluation.distance import METRICS, pairwise_distance
from stenvan.evaluation.plots import plot_cmc, plot_ranked_list
from stenvan.evaluation.protocols import (
    PROTOCOLS,
    RANKS,
    protocols_for,
    selection_protocol,
    evaluate_all,
    evaluate_protocol,
    format_table,
    gallery_mask,
    official,
    query_distances,
    scalar_metrics,
    standard,
    top_k_matches,
    torchreid,
)
from stenvan.evaluation.records import DISTRACTOR_PID, JUNK_PID, Tracklets

__all__ = [
    "DISTRACTOR_PID", "JUNK_PID", "METRICS", "PROTOCOLS", "RANKS", "Tracklets", "evaluate_all",
    "evaluate_protocol", "format_table", "gallery_mask", "official", "pairwise_distance", "plot_cmc",
    "plot_ranked_list", "protocols_for", "query_distances", "scalar_metrics", "selection_protocol", "standard",
    "top_k_matches", "torchreid",
]

"""One evaluation of a checkpoint on a prepared dataset, start to end: what eval.py runs, and the 10-split runner
(stenvan.training.splits) after each split.

The split is checked against the dataset before any model is loaded, the model against the split's identities
(stenvan.evaluation.leakage) before any feature is computed, and the output folder before all of them
(stenvan.outputs: new, empty or an earlier evaluation, replaced only with `force`); the outputs are written
together (stenvan.evaluation.evaluate.write_outputs).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from stenvan.person_splits import Split, check_split


def default_out(checkpoint: str | os.PathLike, mode: str, split: Split, untrained: bool = False) -> Path:
    """<checkpoint dir>/eval-<mode>[-split<N>|-val][-untrained]."""
    named = "" if split is None else "-val" if split == "val" else f"-split{split}"
    return Path(checkpoint).parent / (f"eval-{mode}{named}" + ("-untrained" if untrained else ""))


def evaluate_checkpoint(checkpoint: str, data: str, out: Path, *, split: Split = None, mode: str = "paper",
                        device: str = "auto", precision: str = "auto", loader: str = "dali", workers: int = 2,
                        batch_size: int = 32, metric: str = "cosine", original_arch: str | None = None,
                        untrained: bool = False, clip_len: int | None = None, height: int | None = None,
                        width: int | None = None, rerank: dict | None = None,
                        force: bool = False) -> tuple[dict, dict, dict]:
    """(results per protocol, the metrics written to out/metrics.json, feature stats). `rerank`: {"k1", "k2",
    "lambda"} adds `<protocol>_rerank` results; `force` replaces an earlier evaluation in `out`. Raises the user
    errors eval.py reports in one line."""
    from stenvan.amp import resolve_precision
    from stenvan.distributed import describe
    from stenvan.evaluation.evaluate import evaluate_model, load_model_for_eval, with_rerank, write_outputs
    from stenvan.evaluation.leakage import check_leakage
    from stenvan.outputs import EVAL_FOLDER, check_output
    from stenvan.shards import load_manifest

    # Before any work: the outputs never replace an input, nor anything but an earlier evaluation.
    check_output(out, EVAL_FOLDER, {"--checkpoint": checkpoint, "--data": data}, force, command="eval.py")
    manifest = load_manifest(data)
    check_split(manifest, split)
    torch_device = describe(device).device
    precision = resolve_precision(precision, torch_device)
    model, settings = load_model_for_eval(checkpoint, original_arch, untrained)
    leakage = check_leakage(settings["trained_on"], manifest, split, checkpoint)
    # The output folder before the features (check_output refused a path that is not one): a folder that cannot be
    # made fails now, not after them.
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch_device)
    settings.update({k: v for k, v in (("clip_len", clip_len), ("height", height), ("width", width)) if v is not None})
    model.check_clip_length(settings["clip_len"])
    evaluation = evaluate_model(
        model, data, mode=mode, clip_len=settings["clip_len"], height=settings["height"], width=settings["width"],
        device=torch_device, precision=precision, loader=loader, workers=workers, batch_size=batch_size,
        metric=metric, split=split, manifest=manifest)
    results, stats = evaluation.results, evaluation.stats
    extra = {"checkpoint": str(checkpoint), "model": settings["source"], "arch": settings["arch"], "mode": mode,
             "metric": metric, "data": str(data), "dataset": manifest["dataset"], "split": split, **leakage}
    if "person_splits_source" in manifest:
        extra["person_splits_source"] = manifest["person_splits_source"]
    if rerank:
        start = time.perf_counter()
        results = with_rerank(results, evaluation.features, evaluation.records, metric, k1=rerank["k1"],
                              k2=rerank["k2"], lambda_value=rerank["lambda"])
        extra["rerank_params"] = {**rerank, "seconds": time.perf_counter() - start}
    extra["feature_frames_per_s"] = stats["frames_per_s"]
    metrics = write_outputs(out, results, evaluation, metric, extra)
    return results, metrics, stats

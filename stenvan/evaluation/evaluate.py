"""Evaluate a model on a prepared dataset: features per tracklet, the dataset's protocols, and the outputs.

Features carry their labels: every feature row is built from the eval loader's (key, pid, camid) for that
tracklet, and the protocols select queries and galleries from those labels, never from row positions.
MARS, LS-VID: one record per test tracklet (the gallery split), queries marked. DukeV: the query split (not in
the gallery) plus the gallery split, which holds its own copy of every query tracklet. iLIDS-VID, PRID-2011: the
query (camera 1) and gallery (camera 2) tracklets of one person split's test persons. LS-VID's val set: every
val tracklet, each a query (stenvan.person_splits.eval_sets).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from stenvan.amp import AMP_DTYPES
from stenvan.amp import autocast as amp_autocast
from stenvan.evaluation import (Tracklets, evaluate_all, plot_cmc, plot_ranked_list, protocols_for, query_distances,
                                top_k_matches)
from stenvan.evaluation.leakage import ORIGINAL_RELEASE
from stenvan.evaluation.protocols import scalar_metrics
from stenvan.person_splits import Split, entries, eval_sets
from stenvan.shards import atomic_write, load_manifest


@dataclass
class Evaluation:
    """What `evaluate_model` computed: the protocols' results, and what eval.py's outputs are made of."""
    results: dict  # {"official": {...}, "standard": {...}, "torchreid": {...}}
    features: np.ndarray  # (N, 2048) float32, one row per record
    records: Tracklets  # the labels of each row
    origin: list[tuple[str, int]]  # each record's (split, index in that split)
    tables: dict  # split -> its TrackletTable (the frames, e.g. for thumbnails)
    stats: dict  # frames, seconds, frames_per_s of the feature extraction



@contextlib.contextmanager
def channels_last(model: torch.nn.Module):
    """Run `model` with channels_last weights (cuDNN's fast NHWC kernels; the conv outputs follow the weights),
    then give it back in the memory format it came in (the trainer's model keeps its own)."""
    was = all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if not was:
            model.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def extract_split(model: torch.nn.Module, shard_dir: str, split: str, *, mode: str, clip_len: int, height: int,
                  width: int, device: torch.device, precision: str, loader: str = "dali", workers: int = 2,
                  batch_size: int = 32, progress: bool = True, person_split: Split = None,
                  table=None) -> tuple[np.ndarray, dict]:
    """Post-BN features (num_tracklets, 2048) of a split (of person split `person_split`) in manifest order. Dense:
    the mean of a tracklet's clip features weighted by the distinct frames each clip holds, so that every frame
    weighs the same. `table`: the split's TrackletTable, if the caller has read it already."""
    from tqdm import tqdm

    from stenvan.data import TrackletTable, build_eval_loader

    table = table if table is not None else TrackletTable.from_dir(shard_dir, split, person_split)
    tracklets = table.tracklets
    batches = build_eval_loader(shard_dir, split, mode=mode, clip_len=clip_len, height=height, width=width,
                                batch_size=batch_size, backend=loader, device=device, dtype=AMP_DTYPES[precision],
                                workers=workers, table=table)

    def checked(stream):
        for batch in stream:
            for i, key, pid in zip(batch["tracklet"].tolist(), batch["keys"], batch["pids"].tolist()):
                if tracklets[i].key != key or tracklets[i].pid != pid:  # never misattribute a feature
                    raise RuntimeError(f"eval loader gave {key} (pid {pid}) for tracklet {i} = {tracklets[i].key}")
            yield batch

    with batches, tqdm(total=len(tracklets), desc=f"features {split}", unit="tracklet",
                       disable=None if progress else True) as bar:
        features, stats = features_per_tracklet(model, checked(batches), len(tracklets), device=device,
                                                precision=precision, bar=bar)
    if stats["missing"]:
        missing = [tracklets[i].key for i in stats["missing"][:5]]
        raise RuntimeError(f"eval loader skipped tracklets of {split}, e.g. {missing}")
    return features, {k: stats[k] for k in ("frames", "seconds", "frames_per_s")}


@torch.no_grad()
def features_per_tracklet(model: torch.nn.Module, batches, num_tracklets: int, *, device: torch.device,
                          precision: str, bar=None) -> tuple[np.ndarray, dict]:
    """Post-BN features (num_tracklets, 2048): each tracklet's clip features averaged (one clip in paper mode).

    `batches` yield {"clips": (B, T, 3, H, W) on `device`, "tracklet": (B,) int64 index of each clip's tracklet,
    "real_frames": (B,) distinct frames each clip holds}: a clip's weight, so that every real frame of a tracklet
    counts the same in dense mode (see stenvan.data.sampling.dense_chunks). The one place where clip features
    become tracklet features, for eval (extract_split) and stenvan.inference.embed alike.
    Returns (features, stats) with stats["missing"] = indices of tracklets that got no clip.
    """
    model.eval()
    sums = torch.zeros(num_tracklets, 2048, device=device)
    weights = torch.zeros(num_tracklets, device=device)  # per tracklet: the distinct frames its clips hold
    seen = torch.zeros(num_tracklets, dtype=torch.bool)
    frames = 0
    start = time.perf_counter()
    autocast = amp_autocast(device, precision)
    with channels_last(model):
        for batch in batches:
            index = batch["tracklet"].to(device)
            with autocast:
                feats = model(batch["clips"]).float()  # (N, 2048) post-BN features
            w = batch["real_frames"].to(device=device, dtype=torch.float32)  # (N,)
            sums.index_add_(0, index, feats * w[:, None])
            weights.index_add_(0, index, w)
            newly = ~seen[batch["tracklet"]]
            seen[batch["tracklet"]] = True
            if bar is not None:
                bar.update(int(newly.sum()))
            frames += batch["clips"].shape[0] * batch["clips"].shape[1]
    seconds = time.perf_counter() - start
    stats = {"frames": frames, "seconds": seconds, "frames_per_s": frames / max(seconds, 1e-9),
             "missing": torch.nonzero(~seen).flatten().tolist()}
    return (sums / weights.clamp_min(1)[:, None]).cpu().numpy(), stats


def build_records(manifest: dict, person_split: Split = None) -> tuple[Tracklets, list[tuple[str, int]]]:
    """Records of every evaluated tracklet of a loaded manifest (of a person split, or LS-VID's "val") and, for each,
    its (split, index in that split's entries)."""
    keys, pids, camids, is_query, in_gallery, origin = [], [], [], [], [], []
    for split, query_flag, gallery_flag in eval_sets(manifest, person_split):
        for i, e in enumerate(entries(manifest, split, person_split)):
            keys.append(f"{split}/{e['key']}")
            pids.append(e["pid"])
            camids.append(e["camid"])
            is_query.append(bool(e.get("query")) if query_flag is None else query_flag)
            in_gallery.append(gallery_flag)
            origin.append((split, i))
    records = Tracklets(np.array(keys), np.array(pids), np.array(camids), np.array(is_query), np.array(in_gallery))
    return records, origin


def evaluate_model(model, shard_dir: str, *, mode: str, clip_len: int, height: int, width: int, device,
                   precision: str, loader: str = "dali", workers: int = 2, batch_size: int = 32,
                   metric: str = "cosine", progress: bool = True, split: Split = None,
                   manifest: dict | None = None) -> Evaluation:
    """Features for every record, then the dataset's protocols' results (stenvan.evaluation.protocols_for): MARS,
    DukeV {"official", "standard", "torchreid"}; iLIDS-VID, PRID-2011 {"cross_camera"} of person split `split`;
    LS-VID {"sinet", "bicnet"}, or {"bicnet"} on its val set (split "val"). The manifest is read and checked once
    (or given: `load_manifest(shard_dir)`), and each evaluated split's table once (the loader and the thumbnails
    share it). An empty gallery is refused before any feature is computed (every query would score 0)."""
    from stenvan.data import TrackletTable

    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    if not any(entries(manifest, name, split) for name, _, in_gallery in eval_sets(manifest, split) if in_gallery):
        named = "" if split is None else f" (split {split})"
        raise ValueError(f"{shard_dir}: its gallery split{named} is empty: there is nothing to rank the queries "
                         "against; evaluate a dataset whose test tracklets were prepared (see `python -m prepare "
                         "inspect`)")
    parts, tables, stats = [], {}, {"frames": 0, "seconds": 0.0}
    for name, _, _ in eval_sets(manifest, split):
        tables[name] = TrackletTable.from_dir(shard_dir, name, split, manifest)
        feats, s = extract_split(model, shard_dir, name, mode=mode, clip_len=clip_len, height=height, width=width,
                                 device=device, precision=precision, loader=loader, workers=workers,
                                 batch_size=batch_size, progress=progress, table=tables[name])
        parts.append(feats)
        stats["frames"] += s["frames"]
        stats["seconds"] += s["seconds"]
    features = np.concatenate(parts)
    records, origin = build_records(manifest, split)
    results = evaluate_all(features, records, metric=metric, names=protocols_for(manifest["dataset"], split))
    stats["frames_per_s"] = stats["frames"] / max(stats["seconds"], 1e-9)
    return Evaluation(results, features, records, origin, tables, stats)


def with_rerank(results: dict, features: np.ndarray, records: Tracklets, metric: str = "cosine",
                k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> dict:
    """`results` with a re-ranked entry after each protocol: {"official", "official_rerank", "standard", ...}.

    k-reciprocal re-ranking (stenvan.evaluation.rerank) within each protocol's own gallery; the plain
    results stay as they are, so the two are always reported side by side.
    """
    from stenvan.evaluation import evaluate_protocol
    from stenvan.evaluation.rerank import rerank_distances

    out = {}
    for name, result in results.items():
        out[name] = result
        dist = rerank_distances(features, records, name, metric, k1=k1, k2=k2, lambda_value=lambda_value)
        out[f"{name}_rerank"] = evaluate_protocol(dist, records, name)
    return out


OUTPUTS = ("metrics.json", "features.npz", "cmc.png", "ranked_list.png")


def write_outputs(out_dir: str | os.PathLike, results: dict, evaluation: Evaluation, metric: str, extra: dict,
                  num_queries_shown: int = 6):
    """metrics.json, features.npz, cmc.png and ranked_list.png in `out_dir`, written together
    (stenvan.outputs.written_together: a staging folder, then renames), so a failure (a full disk) leaves `out_dir`
    as it was, never a new metrics.json beside an older run's features.
    `results`: the evaluation's own, or with re-ranked entries added (`with_rerank`)."""
    from stenvan.outputs import written_together

    features, records = evaluation.features, evaluation.records
    with written_together(out_dir, OUTPUTS) as staging:
        metrics = {**scalar_metrics(results), **extra}
        atomic_write(staging / "metrics.json", json.dumps(metrics, indent=1, allow_nan=False) + "\n")
        buffer = io.BytesIO()
        np.savez(buffer, keys=records.keys, pids=records.pids, camids=records.camids, is_query=records.is_query,
                 features=features.astype(np.float32))
        atomic_write(staging / "features.npz", buffer.getvalue())
        plot_cmc(results, staging / "cmc.png")
        pick = np.linspace(0, len(records.query_indices) - 1, num=min(num_queries_shown, len(records.query_indices)))
        rows = sorted(set(pick.astype(int).tolist()))
        shown = _subset_queries(records, rows)  # only the shown queries: their distances alone are computed
        drawn = next(iter(results)).removesuffix("_rerank")  # the dataset's first protocol (MARS: official)
        order, statuses = top_k_matches(query_distances(features, shown, metric), shown, drawn, k=10)
        thumbs = thumbnails(evaluation.tables, evaluation.origin)
        query_thumbs = [thumbs(records.query_indices[r]) for r in rows]
        ranked = [[thumbs(j) for j in order[i]] for i in range(len(rows))]
        titles = [str(records.keys[records.query_indices[r]]) for r in rows]
        plot_ranked_list(query_thumbs, ranked, statuses.tolist(), staging / "ranked_list.png", query_titles=titles)
    return metrics


def _subset_queries(records: Tracklets, rows: list[int]) -> Tracklets:
    """The same records with only the chosen queries (rows of records.query_indices) still marked as queries."""
    keep = np.zeros(len(records), dtype=bool)
    keep[records.query_indices[rows]] = True
    return Tracklets(records.keys, records.pids, records.camids, records.is_query & keep, records.in_gallery)


def thumbnails(tables: dict, origin: list[tuple[str, int]]):
    """record index -> the tracklet's first frame as a 64x32 RGB uint8 thumbnail (read from its shard by offset,
    decoded by the loaders' rule: EXIF ignored); `tables`: split -> TrackletTable, `origin`: each record's
    (split, index in that split)."""
    from stenvan.data.clips import resize_frame
    from stenvan.decode import decode_frame

    stores: dict[str, object] = {}

    def thumb(record: int) -> np.ndarray:
        split, i = origin[record]
        table = tables[split]
        store = stores.setdefault(split, table.store())
        location = table.frame_locations(i, [0])[0]
        frame = decode_frame(store.read(*location), location[3])
        return resize_frame(frame, 64, 32).permute(1, 2, 0).numpy()

    return thumb


def load_model_for_eval(checkpoint: str, original_arch: str | None, untrained: bool = False):
    """(model, settings) from a stenvan checkpoint, or from a checkpoint released by the original project.

    settings: arch, clip_len, height, width, seed and the checkpoint's training config (if any).
    untrained=True builds the same model with the run's seed and initial weights, without loading any.
    """
    from stenvan.checkpoint import CheckpointError, read_checkpoint
    from stenvan.errors import torch_load_error
    from stenvan.config import config_from_dict
    from stenvan.models.from_config import build_model_from_config

    if original_arch:
        from stenvan.models import load_original_checkpoint

        if os.path.exists(checkpoint) and not os.path.isfile(checkpoint):  # a folder, a FIFO (it would block)
            raise CheckpointError(f"{checkpoint}: not a checkpoint file (a folder or a special file)")
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{checkpoint}: checkpoint not found") from None
        except Exception as e:  # noqa: BLE001 - torch raises many types for a file it cannot read
            raise CheckpointError(torch_load_error(checkpoint, e, "a PyTorch state dict", "pass the original "
                                                   "project's released .pth file")) from None
        try:
            model = load_original_checkpoint(state, original_arch)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{checkpoint}: not an original {original_arch} checkpoint: {e}") from None
        return model, {"arch": original_arch, "clip_len": 8, "height": 256, "width": 128, "source": "original",
                       "trained_on": ORIGINAL_RELEASE}
    state = read_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    torch.manual_seed(cfg.seed)  # the trainer's initial weights (what "untrained" means)
    # ImageNet weights matter only for "untrained" (the trainer started from them); otherwise the checkpoint
    # overwrites every weight.
    model = build_model_from_config(cfg, state["num_classes"], pretrained=untrained)
    if not untrained:
        try:
            model.load_state_dict(state["model"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{checkpoint}: does not fit a {cfg.arch} model with {state['num_classes']} classes "
                                  f"({str(e).splitlines()[0]}); it was written for another model") from None
    return model, {"arch": cfg.arch, "clip_len": cfg.clip_len, "height": cfg.height, "width": cfg.width,
                   "source": "untrained" if untrained else "stenvan", "config": cfg,
                   "trained_on": None if untrained else state.get("train_data")}

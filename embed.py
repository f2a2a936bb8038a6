"""Embed tracklets with a trained model, or search a gallery of tracklets for query tracklets.

    # features: DIR holds one folder of frames (JPEG/PNG, ordered by file name) per tracklet
    python embed.py --checkpoint runs/ste_mars/last.pt --tracklets DIR --out features.npz [--mode paper|dense]
    python embed.py --checkpoint runs/ste_mars/last.pt --tracklets shards/mars --split gallery --out features.npz
    python embed.py --checkpoint STE_NVAN.pth --original-arch ste_nvan --tracklets DIR --out features.npz

    # search: the top k gallery tracklets of every query tracklet (folders of tracklets or prepared shards)
    python embed.py --checkpoint runs/ste_mars/last.pt --query QDIR --gallery GDIR --top-k 10 --out DIR [--rerank]
    python embed.py --checkpoint runs/demo/last.pt --query shards/demo --gallery shards/demo --drop-junk --out DIR

features.npz: keys, features (N, 2048) float32 (eval.py's retrieval feature), num_frames (+ pids, camids for
shards). Search writes DIR/ranking.csv (query, rank, gallery, distance[, status][, original_distance]),
DIR/query.npz, DIR/gallery.npz and DIR/ranked/NNNN_<query>.png (the query and its top k, like eval's
ranked_list.png) for the first --pictures queries, all written together (a failure leaves --out as it was). Bad
input ends with one line and exit code 2. --out is checked before any work (stenvan.outputs): it never replaces
an input, a checkpoint or anything but an earlier output of the same kind, which takes --force.
"""

import argparse
import io
import sys
from pathlib import Path

SPLITS = ("train", "query", "gallery", "val")  # stenvan.shards.SPLITS + LS-VID's val (not imported: --help stays instant)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="stenvan checkpoint, or an original one (--original-arch)")
    parser.add_argument("--original-arch", choices=("baseline", "nvan", "ste_nvan"),
                        help="the checkpoint is one released by the original STE-NVAN project, of this model")
    parser.add_argument("--tracklets", help="embed: a folder of tracklet folders, or a prepared shard folder")
    parser.add_argument("--split", choices=SPLITS, default="gallery", help="embed from shards: the split")
    parser.add_argument("--query", help="search: query tracklets (folder of tracklet folders, or shards)")
    parser.add_argument("--gallery", help="search: gallery tracklets (folder of tracklet folders, or shards)")
    parser.add_argument("--query-split", choices=SPLITS, default="query", help="search from shards: the queries' split")
    parser.add_argument("--gallery-split", choices=SPLITS, default="gallery", help="search from shards: the gallery's split")
    parser.add_argument("--top-k", type=int, default=10, help="search: gallery tracklets listed per query")
    parser.add_argument("--rerank", action="store_true", help="search: k-reciprocal re-ranking (k1 20, k2 6, λ 0.3)")
    parser.add_argument("--drop-junk", action="store_true",
                        help="search between shards: leave out same-identity same-camera matches and label -1, as "
                             "the evaluation protocols do")
    parser.add_argument("--pictures", type=int, default=20, help="search: ranked-list pictures for the first N queries")
    parser.add_argument("--out", required=True, help="embed: the .npz file; search: the output folder")
    parser.add_argument("--force", action="store_true", help="replace an earlier output of embed.py at --out")
    parser.add_argument("--mode", choices=("paper", "dense"), default="paper")
    parser.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="frame-decoding worker processes")
    parser.add_argument("--loader", choices=("dali", "torch"), default="dali", help="for shards: eval's loader")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--clip-len", type=int, help="frames per clip (default: the checkpoint's; 8 for originals)")
    parser.add_argument("--height", type=int, help="input height (default: the checkpoint's; 256 for originals)")
    parser.add_argument("--width", type=int, help="input width (default: the checkpoint's; 128 for originals)")
    args = parser.parse_args(argv)

    from stenvan.checkpoint import CheckpointError
    from stenvan.distributed import DeviceError
    from stenvan.errors import error_line
    from stenvan.inference.embed import Embedder, InputError
    from stenvan.outputs import FEATURES, SEARCH_FOLDER, check_output
    from stenvan.shards import ShardFormatError

    try:
        search = args.query is not None or args.gallery is not None
        if search and (args.query is None or args.gallery is None or args.tracklets is not None):
            raise InputError("search needs both --query and --gallery (and no --tracklets)")
        if not search and args.tracklets is None:
            raise InputError("pass --tracklets DIR to embed, or --query QDIR --gallery GDIR to search")
        if args.top_k < 1 or args.pictures < 0:
            raise InputError(f"--top-k must be >= 1 and --pictures >= 0, got {args.top_k} and {args.pictures}")
        for path in [args.tracklets, args.query, args.gallery]:
            if path is not None and not Path(path).is_dir():
                raise InputError(f"{path}: no such folder")
        if args.drop_junk and not (search and is_shards(args.query) and is_shards(args.gallery)):
            raise InputError("--drop-junk needs identities: search with --query and --gallery both prepared shard "
                             "folders")
        # Before any work: never over an input, a checkpoint or anything but an earlier output of this kind.
        inputs = {"--checkpoint": args.checkpoint, "--tracklets": args.tracklets, "--query": args.query,
                  "--gallery": args.gallery}
        check_output(args.out, SEARCH_FOLDER if search else FEATURES, inputs, args.force, command="embed.py")
        embedder = Embedder(args.checkpoint, original_arch=args.original_arch, mode=args.mode, device=args.device,
                            precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                            clip_len=args.clip_len, height=args.height, width=args.width)
        if search:
            return run_search(embedder, args)
        embedded = embed_source(embedder, args.tracklets, args.split, args.loader)
        save_npz(args.out, embedded)
    except (InputError, CheckpointError, ShardFormatError, DeviceError, ValueError, MemoryError, ImportError,
            OSError) as e:
        print(f"embed: error: {error_line(e, 'rerun')}", file=sys.stderr)
        return 2
    print(f"embedded {len(embedded.keys)} tracklets ({int(embedded.num_frames.sum()):,} frames, {args.mode} mode) "
          f"-> {args.out}")
    return 0


def is_shards(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def embed_source(embedder, path: str, split: str, loader: str):
    """A prepared shard folder (it holds manifest.json) through eval's extraction, else a folder of tracklets."""
    if is_shards(path):
        return embedder.embed_split(path, split, loader=loader)
    return embedder.embed_folder(path)


def save_npz(path, embedded) -> None:
    """embed.py's features file (stenvan.outputs.FEATURES recognises it), written atomically."""
    import numpy as np

    from stenvan.shards import atomic_write

    arrays = {"keys": np.array(embedded.keys), "features": embedded.features.astype(np.float32),
              "num_frames": embedded.num_frames}
    if embedded.pids is not None:
        arrays.update(pids=embedded.pids, camids=embedded.camids)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())  # never a half-written file under the final name


def run_search(embedder, args) -> int:
    from stenvan.inference.search import (SEARCH_OUTPUTS, match_status, reranked_top_k, top_k, write_pictures,
                                          write_ranking)
    from stenvan.outputs import written_together

    query = embed_source(embedder, args.query, args.query_split, args.loader)
    gallery = embed_source(embedder, args.gallery, args.gallery_split, args.loader)
    labelled = query.pids is not None and gallery.pids is not None
    labels = (query.pids, query.camids, gallery.pids, gallery.camids) if args.drop_junk else None
    original = None
    if args.rerank:
        idx, dist, original = reranked_top_k(query.features, gallery.features, args.top_k, args.metric,
                                             embedder.device, labels=labels)
    else:
        idx, dist = top_k(query.features, gallery.features, args.top_k, args.metric, embedder.device, labels=labels)
    if labelled:
        statuses = [match_status(query.pids[i], query.camids[i], gallery.pids[row], gallery.camids[row])
                    for i, row in enumerate(idx)]
    else:
        statuses = [["unlabelled"] * len(row) for row in idx]
    out = Path(args.out)
    with written_together(out, SEARCH_OUTPUTS) as staging:  # all of them, or none (a full disk, a bad name)
        save_npz(staging / "query.npz", query)
        save_npz(staging / "gallery.npz", gallery)
        write_ranking(staging / "ranking.csv", query.keys, gallery.keys, idx, dist, statuses if labelled else None,
                      original)
        pictures = write_pictures(staging / "ranked", query.keys, query.thumbnail, gallery.thumbnail, idx, dist,
                                  statuses, args.pictures)
    ranking, pictures = out / "ranking.csv", [out / "ranked" / p.name for p in pictures]
    how = f"{args.metric} distance" + (", k-reciprocal re-ranked" if args.rerank else "")
    print(f"search: {len(query.keys)} queries x {len(gallery.keys)} gallery tracklets, top {idx.shape[1]}, {how}")
    for i in range(min(3, len(query.keys))):
        shown = [f"{r + 1}. {gallery.keys[j]} {d:.3f}" + (f" ({statuses[i][r]})" if labelled else "")
                 for r, (j, d) in enumerate(zip(idx[i][:5], dist[i][:5])) if d != float("inf")]
        print(f"  query {query.keys[i]}: " + ", ".join(shown))
    print(f"ranking: {ranking}")
    if pictures:
        print(f"pictures: {len(pictures)} in {out / 'ranked'}, e.g. {pictures[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

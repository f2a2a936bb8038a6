"""`python -m prepare inspect DIR [--json]`: what a prepared dataset holds, from its manifest, and whether the shards
beside it are the ones it describes (sizes and index hashes: cheap; `prepare verify` reads every byte)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

from stenvan.shards import SPLITS, load_manifest

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return 0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[rank]


def shard_problems(directory: str, manifest: dict) -> list[str]:
    """The shards and indexes beside the manifest that are missing, of another size, or whose index differs from
    the one it recorded: shards of another dataset (a manifest copied beside them), or damaged ones."""
    problems = []
    for shard in manifest["shards"]:
        tar, idx = Path(directory) / shard["name"], Path(directory) / shard["index"]
        try:
            size = os.path.getsize(tar)
            index_sha256 = hashlib.sha256(idx.read_bytes()).hexdigest()
        except OSError as e:
            problems.append(f"{e.filename}: {e.strerror}; the manifest lists it")
            continue
        if size != shard["bytes"] or index_sha256 != shard["index_sha256"]:
            what = f"{size} bytes, the manifest says {shard['bytes']}" if size != shard["bytes"] else \
                f"its index {idx.name} is not the one the manifest records"
            problems.append(f"{tar}: {what}")
    if problems:
        problems.append(f"{directory}: the shards beside manifest.json are not the ones it describes (another "
                        "dataset's, or damaged); `python -m prepare verify` says more, rerunning the prepare command "
                        "that wrote the folder restores it")
    return problems


def summarize(directory: str) -> dict:
    manifest = load_manifest(directory)
    out = {"dataset": manifest["dataset"], "format_version": manifest["version"], "shards": len(manifest["shards"]),
           "bytes": sum(s["bytes"] for s in manifest["shards"]), "skipped": len(manifest["skipped"]), "splits": {}}
    for split in SPLITS:
        info = manifest["splits"][split]
        entries = info["tracklets"]
        lengths = sorted(e["num_frames"] for e in entries)
        out["splits"][split] = {
            "ids": info["num_ids"], "tracklets": info["num_tracklets"], "frames": info["num_frames"],
            "length_percentiles": {f"p{q}": _percentile(lengths, q) for q in PERCENTILES},
            "cameras": {str(c): n for c, n in sorted(Counter(e["camid"] for e in entries).items())},
            "junk": sum(bool(e.get("junk")) for e in entries),
            "distractors": sum(bool(e.get("distractor")) for e in entries),
            "marked_query": sum(bool(e.get("query")) for e in entries),
        }
    out["problems"] = shard_problems(directory, manifest)
    return out


def format_summary(s: dict) -> str:
    lines = [f"{s['dataset']}: {s['shards']} shards, {s['bytes'] / 2**20:,.1f} MiB, format v{s['format_version']}, "
             f"{s['skipped']} skipped tracklets"]
    head = f"{'split':8} {'ids':>6} {'tracklets':>9} {'frames':>10}  length p0/p5/p25/p50/p75/p95/p100"
    lines += [head, "-" * len(head)]
    for split, d in s["splits"].items():
        pct = "/".join(str(v) for v in d["length_percentiles"].values())
        lines.append(f"{split:8} {d['ids']:>6} {d['tracklets']:>9} {d['frames']:>10}  {pct}")
    for split, d in s["splits"].items():
        cams = " ".join(f"C{c}:{n}" for c, n in d["cameras"].items())
        extra = f"  junk {d['junk']}, distractors {d['distractors']}, marked query {d['marked_query']}"
        lines.append(f"{split:8} cameras {cams}" + (extra if split == "gallery" else ""))
    return "\n".join(lines + [f"problem: {p}" for p in s.get("problems", [])])

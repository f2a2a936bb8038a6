"""`python -m prepare inspect DIR [--json] [--split N|val]`: what a prepared dataset holds, from its manifest, and
whether the shards beside it are the ones it describes (sizes and index hashes: cheap; `prepare verify` reads every
byte).

With `--split` (iLIDS-VID, PRID-2011: a person split 0..9; LS-VID: val) the counts are those of that split, and
`--json` also lists its tracklets, each with its source folder, camera and frames (from the tracklet's JSON
member in its shard: the original frame names, in the order they are stored and read).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from stenvan.person_splits import VAL, Split, check_split, entries, name_of
from stenvan.shards import load_manifest, read_index, split_names

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


def _shown_splits(manifest: dict, split: Split) -> tuple[str, ...]:
    if split == VAL:
        return (VAL,)
    names = split_names(manifest["dataset"])
    return tuple(n for n in names if n != VAL) if isinstance(split, int) else names


def summarize(directory: str, split: Split = None) -> dict:
    manifest = load_manifest(directory)
    if split is not None:
        check_split(manifest, split)
    out = {"dataset": manifest["dataset"], "format_version": manifest["version"], "shards": len(manifest["shards"]),
           "bytes": sum(s["bytes"] for s in manifest["shards"]), "skipped": len(manifest["skipped"]), "splits": {}}
    if "person_splits" in manifest:
        out["person_splits"] = {"count": len(manifest["person_splits"]), "source": manifest["person_splits_source"]}
    if split is not None:
        out["split"] = split
    for name in _shown_splits(manifest, split):
        chosen = entries(manifest, name, split)
        lengths = sorted(e["num_frames"] for e in chosen)
        out["splits"][name] = {
            "ids": len({e["pid"] for e in chosen if e["pid"] > 0}), "tracklets": len(chosen),
            "frames": sum(lengths),
            "length_percentiles": {f"p{q}": _percentile(lengths, q) for q in PERCENTILES},
            "cameras": {str(c): n for c, n in sorted(Counter(e["camid"] for e in chosen).items())},
            "junk": sum(bool(e.get("junk")) for e in chosen),
            "distractors": sum(bool(e.get("distractor")) for e in chosen),
            "marked_query": sum(bool(e.get("query")) for e in chosen),
        }
        if split is not None:
            out["splits"][name]["tracklet_list"] = _listed(Path(directory), manifest, chosen)
    out["problems"] = shard_problems(directory, manifest)
    return out


def _listed(directory: Path, manifest: dict, chosen: list[dict]) -> list[dict]:
    """Each tracklet's key, pid, camera, source folder and frame names, read from its JSON member."""
    shards = {s["name"]: s for s in manifest["shards"]}
    indexes: dict[str, list] = {}
    listed = []
    for e in chosen:
        if e["shard"] not in indexes:
            indexes[e["shard"]] = read_index(directory / shards[e["shard"]]["index"])
        meta = indexes[e["shard"]][e["sample"]][0]
        with open(directory / e["shard"], "rb") as f:
            info = json.loads(os.pread(f.fileno(), meta.size, meta.offset))
        listed.append({"key": e["key"], "pid": e["pid"], "camid": e["camid"], "source": info["source"],
                       "frames": info["frames"], **({"label": e["label"]} if "label" in e else {})})
    return listed


def format_summary(s: dict) -> str:
    lines = [f"{s['dataset']}: {s['shards']} shards, {s['bytes'] / 2**20:,.1f} MiB, format v{s['format_version']}, "
             f"{s['skipped']} skipped tracklets"]
    if "person_splits" in s:
        lines.append(f"{name_of(s['dataset'])}: {s['person_splits']['count']} person splits ("
                     f"{s['person_splits']['source']})" + (f"; showing split {s['split']}" if "split" in s else
                                                          "; the counts below are every tracklet (use --split N)"))
    head = f"{'split':8} {'ids':>6} {'tracklets':>9} {'frames':>10}  length p0/p5/p25/p50/p75/p95/p100"
    lines += [head, "-" * len(head)]
    for split, d in s["splits"].items():
        pct = "/".join(str(v) for v in d["length_percentiles"].values())
        lines.append(f"{split:8} {d['ids']:>6} {d['tracklets']:>9} {d['frames']:>10}  {pct}")
    for split, d in s["splits"].items():
        cams = " ".join(f"C{c}:{n}" for c, n in d["cameras"].items())
        extra = f"  junk {d['junk']}, distractors {d['distractors']}, marked query {d['marked_query']}"
        lines.append(f"{split:8} cameras {cams}" + (extra if split in ("gallery", "val") else ""))
    return "\n".join(lines + [f"problem: {p}" for p in s.get("problems", [])])

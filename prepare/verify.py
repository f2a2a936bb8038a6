"""`python -m prepare verify DIR [--deep]`: check a prepared dataset against its manifest.

Checks the manifest's structure and content hash (`load_manifest`), every shard's size and sha256, every index
against the tar headers it describes, and the manifest's counts and tracklet placements against the indexes.
Every manifest entry is compared with the tracklet's JSON member in its shard (key, pid, camera, frame count,
query/junk/distractor flags), every sample must belong to a split, each split must live in the shard group
its dataset puts it in, train labels must follow the pids, and the query marks must agree between splits.
Every frame member's extension (`jpg`/`png`) must name the format of its bytes; iLIDS-VID's and PRID-2011's person
splits must be disjoint halves of persons the manifest holds, each test person with a query and a gallery tracklet.
`--deep` also decodes every frame. Returns one line per problem (an empty list means the dataset is sound).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

from prepare.tracklet import frame_ext
from stenvan.shards import (BLOCK, FRAME_EXTS, SPLIT_GROUPS, ShardFormatError, frame_member, label_problems,
                            load_manifest, member_differences, member_name_problem, padded, read_index, sha256_file,
                            split_names)


def walk_tar(buf) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member, read from the tar headers themselves."""
    members, pos = [], 0
    while pos + BLOCK <= len(buf):
        header = bytes(buf[pos:pos + BLOCK])
        if header == bytes(BLOCK):
            break
        stored = int(header[148:156].strip(b"\0 ") or b"0", 8)
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise ValueError(f"bad tar header checksum at byte {pos}")
        name = header[:100].rstrip(b"\0").decode("ascii", errors="replace")
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        members.append((name, pos + BLOCK, size))
        pos += BLOCK + padded(size)
    return members


def _check_shard(directory: Path, shard: dict, deep: bool, problems: list[str]) -> tuple[list, list] | None:
    """(index samples, the JSON member of each sample or None) of a shard, or None if it cannot be read."""
    tar, idx = directory / shard["name"], directory / shard["index"]
    if not tar.is_file():
        problems.append(f"{tar}: shard missing; rerun the prepare command to rewrite it")
        return None
    if tar.stat().st_size != shard["bytes"]:
        problems.append(f"{tar}: {tar.stat().st_size} bytes, the manifest says {shard['bytes']}; rerun prepare")
        return None
    if sha256_file(tar) != shard["sha256"]:
        problems.append(f"{tar}: sha256 does not match the manifest (the file is corrupt); rerun prepare")
    try:
        samples = read_index(idx)
    except ShardFormatError as e:
        problems.append(str(e))
        return None
    if hashlib.sha256(idx.read_bytes()).hexdigest() != shard["index_sha256"]:
        problems.append(f"{idx}: sha256 does not match the manifest; rerun prepare")
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            members = walk_tar(buf)
        except ValueError as e:
            problems.append(f"{tar}: {e}; rerun prepare")
            return None
        named = [(name, member_name_problem(name)) for name, _, _ in members]
        bad = [f"{name!r} {problem}" for name, problem in named if problem]
        if bad:  # the shards are advertised as plain tars for other tools: never one that escapes its folder
            problems.append(f"{tar}: member {bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; this "
                            "is not a shard prepare wrote: rerun prepare")
            return None
        indexed = [(m.name, m.offset, m.size) for s in samples for m in s]
        if members != indexed:
            first = next((i for i, (a, b) in enumerate(zip(members, indexed)) if a != b), min(len(members), len(indexed)))
            problems.append(f"{idx}: disagrees with the tar headers of {tar.name} from member {first} on; rerun prepare")
            return None
        if len(samples) != shard["num_tracklets"] or sum(len(s) - 1 for s in samples) != shard["num_frames"]:
            problems.append(f"{idx}: {len(samples)} tracklets / {sum(len(s) - 1 for s in samples)} frames, the "
                            f"manifest says {shard['num_tracklets']} / {shard['num_frames']}")
        metas = [_read_json(tar, buf, members, problems) for members in samples]
        _check_frame_formats(tar, buf, samples, problems)
        if deep:
            _decode_all(tar, buf, samples, problems)
    return samples, metas


def _read_json(tar: Path, buf, members, problems: list[str]) -> dict | None:
    meta = members[0]
    try:
        info = json.loads(bytes(buf[meta.offset:meta.offset + meta.size]))
        if not isinstance(info, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        problems.append(f"{tar}: member {meta.name} is not a JSON object")
        return None
    if info.get("num_frames") != len(members) - 1:
        problems.append(f"{tar}: {meta.name} says {info.get('num_frames')} frames, the shard holds {len(members) - 1}")
    return info


def _check_frame_formats(tar: Path, buf, samples, problems: list[str]) -> None:
    """Each frame member's extension names the format its bytes start with (the loaders pick nothing by name, but a
    reader of the tar with webdataset decodes by extension)."""
    for members in samples:
        for m in members[1:]:
            ext = frame_ext(bytes(buf[m.offset:m.offset + 8]))
            if m.name.rsplit(".", 1)[-1] != ext:
                problems.append(f"{tar}: frame {m.name} holds {ext.upper() if ext else 'neither JPEG nor PNG'} bytes, "
                                "not what its extension says; rerun prepare")
                return


def _decode_all(tar: Path, buf, samples, problems: list[str]) -> None:
    """Decode every frame with the decoder of the loaders' rule (stenvan.decode), not another library's."""
    from stenvan.decode import FrameDecodeError, decode_frame

    for members in samples:
        for m in members[1:]:
            try:
                decode_frame(bytes(buf[m.offset:m.offset + m.size]), f"{tar}: frame {m.name}")
            except FrameDecodeError as e:
                problems.append(str(e))


def _check_entry(directory: Path, split: str, e: dict, shard: dict | None, read, problems: list[str]) -> None:
    """One manifest entry against its shard group, its index sample and its JSON member."""
    where = f"{directory / 'manifest.json'}: {split} tracklet {e['key']}"
    if shard is None:
        problems.append(f"{where} names shard {e['shard']}, which the manifest does not list")
        return
    if read is None:
        return  # the shard's own problem is reported already
    samples, metas = read
    names = [m.name for m in samples[e["sample"]]] if 0 <= e["sample"] < len(samples) else []
    frames_named = all(n in {frame_member(e["key"], i, ext) for ext in FRAME_EXTS} for i, n in enumerate(names[1:]))
    if names[:1] != [f"{e['key']}.json"] or not frames_named:
        problems.append(f"{directory / e['shard']}: sample {e['sample']} is not tracklet {e['key']} (its members "
                        "are not named <key>.json, <key>.00000.jpg|png, ...)")
        return
    if len(samples[e["sample"]]) - 1 != e["num_frames"]:
        problems.append(f"{directory / e['shard']}: tracklet {e['key']} holds {len(samples[e['sample']]) - 1} "
                        f"frames, the manifest says {e['num_frames']}")
    meta = metas[e["sample"]]
    if meta is None:
        return
    differ = member_differences(e, meta)
    if differ:
        problems.append(f"{where}: the manifest says {', '.join(differ)}; the manifest was edited or is wrong, "
                        "rerun prepare")


def verify(directory: str | os.PathLike, deep: bool = False) -> list[str]:
    directory = Path(directory)
    path = directory / "manifest.json"
    problems: list[str] = []
    try:
        manifest = load_manifest(directory)
    except ShardFormatError as e:
        return [str(e)]
    shards = {s["name"]: s for s in manifest["shards"]}
    reads = {name: _check_shard(directory, s, deep, problems) for name, s in shards.items()}
    groups = SPLIT_GROUPS[manifest["dataset"]]
    placed: dict[tuple[str, int], set[str]] = {}
    for split in split_names(manifest["dataset"]):
        info = manifest["splits"][split]
        entries = info["tracklets"]
        counts = {"num_tracklets": len(entries), "num_frames": sum(e["num_frames"] for e in entries),
                  "num_ids": len({e["pid"] for e in entries if e["pid"] > 0})}
        for field, value in counts.items():
            if info[field] != value:
                problems.append(f"{path}: {split}.{field} is {info[field]}, its tracklet list gives {value}")
        for e in entries:
            shard = shards.get(e["shard"])
            if shard is not None and shard["group"] != groups[split]:
                problems.append(f"{path}: {split} tracklet {e['key']} is in {e['shard']}, but a {manifest['dataset']}"
                                f" {split} tracklet lives in the {groups[split]!r} shards (was 'dataset' edited?)")
            _check_entry(directory, split, e, shard, reads.get(e["shard"]), problems)
            spot = (e["shard"], e["sample"])
            if split in placed.get(spot, ()):
                problems.append(f"{path}: {split} lists tracklet {e['key']} ({e['shard']} sample {e['sample']}) twice")
            placed.setdefault(spot, set()).add(split)
    for name, read in reads.items():
        for sample, members in enumerate(read[0] if read else []):
            if (name, sample) not in placed:
                problems.append(f"{directory / name}: sample {sample} ({members[0].name}) is in no split of the "
                                "manifest: an entry was dropped; rerun prepare")
    _check_labels(path, manifest["splits"]["train"], problems)
    _check_queries(path, manifest, problems)
    _check_person_splits(path, manifest, problems)
    return problems


def _check_person_splits(path: Path, manifest: dict, problems: list[str]) -> None:
    """Each person split: disjoint train and test persons that the manifest holds; every test person has a query
    (camera 1) and a gallery (camera 2) tracklet, so that each query can be scored."""
    persons = {e["pid"] for e in manifest["splits"]["train"]["tracklets"]}
    queries = {e["pid"] for e in manifest["splits"]["query"]["tracklets"]}
    gallery = {e["pid"] for e in manifest["splits"]["gallery"]["tracklets"]}
    for i, split in enumerate(manifest.get("person_splits", [])):
        train, test = set(split["train"]), set(split["test"])
        unknown = sorted((train | test) - persons)
        unmatched = sorted(test - (queries & gallery))
        if train & test:
            problems.append(f"{path}: person split {i} puts pids {sorted(train & test)[:3]} in both train and test")
        if unknown:
            problems.append(f"{path}: person split {i} names pids {unknown[:3]} that no tracklet carries")
        elif unmatched and not manifest["skipped"]:
            problems.append(f"{path}: person split {i} tests pids {unmatched[:3]} without both a query and a gallery "
                            "tracklet")


def _check_labels(path: Path, train: dict, problems: list[str]) -> None:
    problems += [f"{path}: {p}" for p in label_problems(train)]


def _check_queries(path: Path, manifest: dict, problems: list[str]) -> None:
    """MARS, LS-VID: the query split is exactly the gallery tracklets marked query. DukeV: a gallery tracklet marked
    query has its query copy (same key) in the query split, unless --skip-bad left that copy out (iLIDS-VID and
    PRID-2011 mark no gallery tracklet: their queries are the other camera's tracklets)."""
    query, gallery = manifest["splits"]["query"]["tracklets"], manifest["splits"]["gallery"]["tracklets"]
    if manifest["dataset"] in ("mars", "lsvid"):
        marked = {(e["shard"], e["sample"]) for e in gallery if e.get("query")}
        if {(e["shard"], e["sample"]) for e in query} != marked:
            problems.append(f"{path}: the query split is not the set of gallery tracklets marked query")
    else:  # (a query copy that --skip-bad left out leaves its gallery copy marked)
        missing = {e["key"] for e in gallery if e.get("query")} - {e["key"] for e in query}
        missing -= {s["key"] for s in manifest["skipped"] if s["group"] == "query"}
        if missing:
            problems.append(f"{path}: gallery tracklets {sorted(missing)[:3]} are marked query but the query split "
                            "does not hold them")

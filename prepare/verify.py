"""`python -m prepare verify DIR [--deep]`: check a prepared dataset against its manifest.

Checks every shard's size and sha256, every index against the tar headers it describes, and the manifest's
counts and tracklet placements against the indexes; `--deep` also reads every tracklet's JSON member and
decodes every frame. Returns one line per problem (an empty list means the dataset is sound).
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
from pathlib import Path

from stenvan.shards import BLOCK, SPLITS, ShardFormatError, load_manifest, padded, read_index, sha256_file


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


def _check_shard(directory: Path, shard: dict, deep: bool, problems: list[str]) -> list | None:
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
            return samples
        indexed = [(m.name, m.offset, m.size) for s in samples for m in s]
        if members != indexed:
            first = next((i for i, (a, b) in enumerate(zip(members, indexed)) if a != b), min(len(members), len(indexed)))
            problems.append(f"{idx}: disagrees with the tar headers of {tar.name} from member {first} on; rerun prepare")
        if len(samples) != shard["num_tracklets"] or sum(len(s) - 1 for s in samples) != shard["num_frames"]:
            problems.append(f"{idx}: {len(samples)} tracklets / {sum(len(s) - 1 for s in samples)} frames, the "
                            f"manifest says {shard['num_tracklets']} / {shard['num_frames']}")
        if deep:
            _decode_all(tar, buf, samples, problems)
    return samples


def _decode_all(tar: Path, buf, samples, problems: list[str]) -> None:
    from PIL import Image

    for members in samples:
        meta = members[0]
        try:
            info = json.loads(bytes(buf[meta.offset:meta.offset + meta.size]))
        except (ValueError, UnicodeDecodeError):
            problems.append(f"{tar}: member {meta.name} is not valid JSON")
            continue
        if info.get("num_frames") != len(members) - 1:
            problems.append(f"{tar}: {meta.name} says {info.get('num_frames')} frames, the shard holds "
                            f"{len(members) - 1}")
        for m in members[1:]:
            try:
                with Image.open(io.BytesIO(bytes(buf[m.offset:m.offset + m.size]))) as image:
                    image.load()
            except Exception as e:  # noqa: BLE001 - any decoder failure is a problem to report
                problems.append(f"{tar}: frame {m.name} does not decode ({e})")


def verify(directory: str | os.PathLike, deep: bool = False) -> list[str]:
    directory = Path(directory)
    problems: list[str] = []
    try:
        manifest = load_manifest(directory)
    except ShardFormatError as e:
        return [str(e)]
    indexes = {s["name"]: _check_shard(directory, s, deep, problems) for s in manifest["shards"]}
    for split in SPLITS:
        info = manifest["splits"].get(split)
        if info is None:
            problems.append(f"{directory / 'manifest.json'}: split {split!r} missing")
            continue
        entries = info["tracklets"]
        counts = {"num_tracklets": len(entries), "num_frames": sum(e["num_frames"] for e in entries),
                  "num_ids": len({e["pid"] for e in entries if e["pid"] > 0})}
        for field, value in counts.items():
            if info.get(field) != value:
                problems.append(f"{directory / 'manifest.json'}: {split}.{field} is {info.get(field)}, its tracklet "
                                f"list gives {value}")
        for e in entries:
            samples = indexes.get(e["shard"], "unknown")
            if samples == "unknown":
                problems.append(f"{directory / 'manifest.json'}: {split} tracklet {e['key']} names shard "
                                f"{e['shard']}, which the manifest does not list")
            elif samples is not None:
                if not 0 <= e["sample"] < len(samples) or samples[e["sample"]][0].name != f"{e['key']}.json":
                    problems.append(f"{directory / e['shard']}: sample {e['sample']} is not tracklet {e['key']}")
                elif len(samples[e["sample"]]) - 1 != e["num_frames"]:
                    problems.append(f"{directory / e['shard']}: tracklet {e['key']} holds "
                                    f"{len(samples[e['sample']]) - 1} frames, the manifest says {e['num_frames']}")
    return problems

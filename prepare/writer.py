"""Write tracklets into verified WebDataset tar shards, resumably, and finish with `manifest.json`.

Plan → write → manifest:
- The plan packs tracklets into shards of at most `shard_bytes` per shard group, from file sizes alone,
  never splitting a tracklet or a run of consecutive tracklets of one identity (the datasets list an
  identity's tracklets together); the same input always gives the same plan.
- Each shard is written to a temporary file and renamed; then its index; then a progress record with its
  sha256. A rerun keeps every shard whose record, plan fingerprint and sha256 still match, and rewrites
  the rest, so a killed run resumes and ends with the bytes of an uninterrupted one.
- The manifest is written last: its presence means the dataset is complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prepare.tracklet import PrepareError, Tracklet, jpeg_problem
from stenvan import __version__
from stenvan.shards import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, SPLITS, TAR_END, IndexedMember, atomic_write,
                            dump_json, format_index, frame_member, load_manifest, member_span, padded, sha256_file,
                            tar_header)

PROGRESS_DIR = ".progress"  # per-shard completion records of an unfinished run
SHARD_NAME = re.compile(r"^(train|test|query|gallery)-\d{5}\.(tar|idx)$")


@dataclass
class ShardJob:
    name: str  # e.g. "train-00000.tar"
    group: str
    tracklets: list[Tracklet]
    fingerprint: str  # sha256 of what the plan puts in the shard: names, sizes, metadata

    @property
    def index_name(self) -> str:
        return self.name[:-len(".tar")] + ".idx"

    @property
    def num_frames(self) -> int:
        return sum(len(t.frames) for t in self.tracklets)


def _member_json(t: Tracklet, root: str) -> bytes:
    return json.dumps(t.metadata(root), sort_keys=True, separators=(",", ":")).encode()


def plan_shards(tracklets: list[Tracklet], shard_bytes: int, root: str) -> list[ShardJob]:
    """Pack tracklets into shards group by group; an identity's consecutive tracklets stay in one shard."""
    jobs: list[ShardJob] = []
    groups = list(dict.fromkeys(t.group for t in tracklets))
    for group in groups:
        runs: list[list[Tracklet]] = []  # consecutive tracklets of one identity
        for t in (t for t in tracklets if t.group == group):
            if runs and runs[-1][0].pid == t.pid:
                runs[-1].append(t)
            else:
                runs.append([t])
        shards: list[list[Tracklet]] = [[]]
        current_bytes = len(TAR_END)
        for run in runs:
            run_bytes = sum(member_span(len(_member_json(t, root))) + sum(member_span(s) for s in t.sizes)
                            for t in run)
            if shards[-1] and current_bytes + run_bytes > shard_bytes:
                shards.append([])
                current_bytes = len(TAR_END)
            shards[-1] += run
            current_bytes += run_bytes
        jobs += [_job(group, number, members, root) for number, members in enumerate(shards) if members]
    return jobs


def _job(group: str, number: int, tracklets: list[Tracklet], root: str) -> ShardJob:
    digest = hashlib.sha256()
    for t in tracklets:
        digest.update(_member_json(t, root))
        digest.update(repr(([os.path.relpath(f, root) for f in t.frames], t.sizes)).encode())
    return ShardJob(f"{group}-{number:05d}.tar", group, tracklets, digest.hexdigest())


# ----------------------------------------------------------------------------------------------------------
# Writing one shard (runs in a worker process)
# ----------------------------------------------------------------------------------------------------------

_frames_done = None  # shared counter for the progress bar, set in each worker by _init_worker


def _init_worker(counter) -> None:
    global _frames_done
    _frames_done = counter


def write_shard(job: ShardJob, out_dir: str, root: str, skip_bad: bool) -> dict:
    """Write one shard and its index atomically; return its progress record."""
    final = os.path.join(out_dir, job.name)
    tmp = os.path.join(out_dir, f".{job.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    samples: list[list[IndexedMember]] = []
    written, skipped = [], []
    offset = 0
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:
            def put(name: str, data: bytes) -> None:
                nonlocal offset
                block = tar_header(name, len(data)) + data + bytes(padded(len(data)) - len(data))
                f.write(block)
                digest.update(block)
                offset += len(block)

            for t in job.tracklets:
                frames, problem = [], None
                for path in t.frames:
                    with open(path, "rb") as src:
                        data = src.read()
                    problem = jpeg_problem(data, path)
                    if problem:
                        break
                    frames.append(data)
                if problem:
                    if not skip_bad:
                        raise PrepareError(problem)
                    skipped.append({"key": t.key, "group": t.group, "reason": problem})
                    continue
                meta = _member_json(t, root)
                members = [IndexedMember("json", offset + 512, len(meta), f"{t.key}.json")]
                put(f"{t.key}.json", meta)
                for i, data in enumerate(frames):
                    name = frame_member(t.key, i)
                    members.append(IndexedMember(name[len(t.key) + 1:], offset + 512, len(data), name))
                    put(name, data)
                samples.append(members)
                written.append(t.key)
                if _frames_done is not None:
                    with _frames_done.get_lock():
                        _frames_done.value += len(frames)
            f.write(TAR_END)
            digest.update(TAR_END)
            f.flush()
            os.fsync(f.fileno())
        if not samples:
            raise PrepareError(f"{job.name}: every tracklet of this shard was skipped as bad; see the messages above")
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    index = format_index(samples)
    atomic_write(os.path.join(out_dir, job.index_name), index)
    record = {"name": job.name, "index": job.index_name, "group": job.group, "plan_sha256": job.fingerprint,
              "sha256": digest.hexdigest(), "bytes": offset + len(TAR_END),
              "index_sha256": hashlib.sha256(index.encode()).hexdigest(), "num_tracklets": len(samples),
              "num_frames": sum(len(s) - 1 for s in samples), "keys": written, "skipped": skipped}
    atomic_write(os.path.join(out_dir, PROGRESS_DIR, job.name + ".json"), dump_json(record))
    return record


# ----------------------------------------------------------------------------------------------------------
# The whole dataset
# ----------------------------------------------------------------------------------------------------------

def _previous_records(out_dir: str, dataset: str) -> dict[str, dict]:
    """Completion records of an earlier run into `out_dir` (finished: from the manifest; killed: .progress/)."""
    records: dict[str, dict] = {}
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        manifest = load_manifest(out_dir)
        if manifest.get("dataset") != dataset:
            raise PrepareError(f"{out_dir}: holds the prepared dataset {manifest.get('dataset')!r}, not {dataset!r}; "
                               "choose another --out or delete that folder")
        records = {s["name"]: s for s in manifest["shards"]}
    owner = os.path.join(out_dir, PROGRESS_DIR, "dataset.json")
    if os.path.exists(owner):
        previous = json.loads(Path(owner).read_text()).get("dataset")
        if previous != dataset:
            raise PrepareError(f"{out_dir}: holds an unfinished prepare of {previous!r}, not {dataset!r}; choose "
                               "another --out or delete that folder")
    for path in glob.glob(os.path.join(out_dir, PROGRESS_DIR, "*.tar.json")):
        record = json.loads(Path(path).read_text())
        records[record["name"]] = record
    return records


def _still_valid(record: dict | None, job: ShardJob, out_dir: str) -> bool:
    if not record or record.get("plan_sha256") != job.fingerprint:
        return False
    tar, idx = os.path.join(out_dir, job.name), os.path.join(out_dir, job.index_name)
    if not (os.path.isfile(tar) and os.path.isfile(idx)) or os.path.getsize(tar) != record["bytes"]:
        return False
    return (hashlib.sha256(Path(idx).read_bytes()).hexdigest() == record["index_sha256"]
            and sha256_file(tar) == record["sha256"])


def _run_jobs(jobs: list[ShardJob], out_dir: str, root: str, skip_bad: bool, workers: int, total_frames: int,
              done_frames: int) -> list[dict]:
    from tqdm import tqdm

    counter = mp.get_context("fork").Value("q", 0)
    bar = tqdm(total=total_frames, initial=done_frames, unit="frame", unit_scale=True, desc="prepare",
               disable=None, file=sys.stderr, smoothing=0.1)
    stop = threading.Event()

    def refresh():  # the workers count frames in shared memory; the bar follows from this thread
        while not stop.wait(0.25):
            bar.n = done_frames + counter.value
            bar.refresh()

    thread = threading.Thread(target=refresh, daemon=True)
    thread.start()
    try:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker(counter)
            return [write_shard(job, out_dir, root, skip_bad) for job in jobs]
        with mp.get_context("fork").Pool(min(workers, len(jobs)), initializer=_init_worker,
                                         initargs=(counter,)) as pool:
            async_results = [pool.apply_async(write_shard, (job, out_dir, root, skip_bad)) for job in jobs]
            return [r.get() for r in async_results]
    finally:
        _init_worker(None)
        stop.set()
        thread.join()
        bar.n = done_frames + counter.value
        bar.close()


def prepare_dataset(dataset: str, tracklets: list[Tracklet], skipped: list[dict], out_dir: str, root: str,
                    shard_bytes: int, workers: int = 1, skip_bad: bool = False) -> dict:
    """Shard `tracklets` into `out_dir`, resuming an earlier run there; returns the manifest."""
    if not tracklets:
        raise PrepareError(f"{root}: no tracklets found; check --data-dir")
    os.makedirs(os.path.join(out_dir, PROGRESS_DIR), exist_ok=True)
    previous = _previous_records(out_dir, dataset)
    atomic_write(os.path.join(out_dir, PROGRESS_DIR, "dataset.json"), dump_json({"dataset": dataset}))
    for leftover in glob.glob(os.path.join(out_dir, ".*.tmp")):  # temp files of a killed run
        os.unlink(leftover)
    jobs = plan_shards(tracklets, shard_bytes, root)
    planned = {j.name for j in jobs} | {j.index_name for j in jobs}
    for name in sorted(os.listdir(out_dir)):
        if SHARD_NAME.match(name) and name not in planned:
            print(f"prepare: removing {name}, left by an earlier run with another plan", file=sys.stderr)
            os.unlink(os.path.join(out_dir, name))
    kept = {j.name: previous[j.name] for j in jobs if _still_valid(previous.get(j.name), j, out_dir)}
    todo = [j for j in jobs if j.name not in kept]
    total = sum(j.num_frames for j in jobs)
    if kept:
        print(f"prepare: resuming, {len(kept)} of {len(jobs)} shards already written and verified", file=sys.stderr)
    start = time.perf_counter()
    fresh = _run_jobs(todo, out_dir, root, skip_bad, workers, total, sum(j.num_frames for j in jobs
                                                                           if j.name in kept))
    seconds = time.perf_counter() - start
    records = {**kept, **{r["name"]: r for r in fresh}}
    manifest = build_manifest(dataset, jobs, records, skipped)
    atomic_write(os.path.join(out_dir, MANIFEST), dump_json(manifest))
    shutil.rmtree(os.path.join(out_dir, PROGRESS_DIR))  # dot-files too (a temp file of a killed atomic write)
    written = sum(j.num_frames for j in todo)
    print(f"prepare: {dataset}: {len(jobs)} shards, {total:,} frames ({written:,} written in {seconds:.1f} s, "
          f"{written / max(seconds, 1e-9):,.0f} frames/s) -> {out_dir}", file=sys.stderr)
    return manifest


def build_manifest(dataset: str, jobs: list[ShardJob], records: dict[str, dict], scan_skipped: list[dict]) -> dict:
    shards, skipped = [], list(scan_skipped)
    placement: dict[tuple[str, str], tuple[str, int]] = {}  # (group, key) -> (shard, sample)
    for job in jobs:
        record = records[job.name]
        shards.append({k: record[k] for k in ("name", "index", "group", "sha256", "bytes", "index_sha256",
                                              "num_tracklets", "num_frames", "plan_sha256")})
        for sample, key in enumerate(record["keys"]):
            placement[(job.group, key)] = (job.name, sample)
        skipped += record["skipped"]
    train_pids = sorted({t.pid for j in jobs for t in j.tracklets if "train" in t.splits
                         and (t.group, t.key) in placement})
    labels = {pid: label for label, pid in enumerate(train_pids)}
    splits = {name: {"tracklets": []} for name in SPLITS}
    for job in jobs:
        for t in job.tracklets:
            if (t.group, t.key) not in placement:
                continue
            shard, sample = placement[(t.group, t.key)]
            entry = {"key": t.key, "pid": t.pid, "camid": t.camid, "num_frames": len(t.frames), "shard": shard,
                     "sample": sample, **t.flags}
            for split in t.splits:
                splits[split]["tracklets"].append({**entry, "label": labels[t.pid]} if split == "train" else entry)
    for split in splits.values():
        entries = split["tracklets"]
        split["num_ids"] = len({e["pid"] for e in entries if e["pid"] > 0})
        split["num_tracklets"] = len(entries)
        split["num_frames"] = sum(e["num_frames"] for e in entries)
    splits["train"]["labels"] = {str(pid): label for pid, label in labels.items()}
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dataset": dataset, "writer": f"stenvan {__version__}",
            "shards": shards, "splits": splits, "skipped": skipped}

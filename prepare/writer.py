"""Write tracklets into verified WebDataset tar shards, resumably, and finish with `manifest.json`.

Plan → write → manifest:
- The plan packs tracklets into shards of at most `shard_bytes` per shard group, from file sizes alone,
  never splitting a tracklet or a run of consecutive tracklets of one identity (the datasets list an
  identity's tracklets together); the same input always gives the same plan.
- Each shard and its index are written to temporary files in `.prepare/`, then its record (sha256, plan and
  input fingerprints, see `prepare.records`), then both are renamed into place. A killed run leaves only
  finished shards under their final names; a rerun keeps those whose record still matches and writes the rest.
- The manifest is written last: its presence means the dataset is complete. The rerun of a finished dataset
  (`prepare.build`) never changes it piecemeal.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from prepare.records import records_dir, save_record
from prepare.tracklet import PrepareError, Tracklet, frame_ext, frame_problem, read_frame_file
from stenvan import __version__
from stenvan.shards import (BLOCK, FORMAT_NAME, TAR_END, IndexedMember, atomic_write, format_index, frame_member,
                            manifest_version, member_span, padded, seal_manifest, sha256_file, split_names, tar_header)


@dataclass
class ShardJob:
    name: str  # e.g. "train-00000.tar"
    group: str
    tracklets: list[Tracklet]
    fingerprint: str  # sha256 of what the plan puts in the shard: names, sizes, metadata
    inputs: str  # sha256 of its frames' sizes and modification times: a changed input file changes it
    metas: list[bytes]  # each tracklet's JSON member

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
    metas = {id(t): _member_json(t, root) for t in tracklets}
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
            run_bytes = sum(member_span(len(metas[id(t)])) + sum(member_span(s) for s in t.sizes) for t in run)
            if shards[-1] and current_bytes + run_bytes > shard_bytes:
                shards.append([])
                current_bytes = len(TAR_END)
            shards[-1] += run
            current_bytes += run_bytes
        jobs += [_job(group, number, members, [metas[id(t)] for t in members])
                 for number, members in enumerate(shards) if members]
    return jobs


def _job(group: str, number: int, tracklets: list[Tracklet], metas: list[bytes]) -> ShardJob:
    digest, inputs = hashlib.sha256(), hashlib.sha256()
    for t, meta in zip(tracklets, metas):
        digest.update(meta)  # key, pid, camera, flags, the frames' folder and names
        digest.update(repr(t.sizes).encode())
        inputs.update(repr((t.sizes, t.mtimes)).encode())
    return ShardJob(f"{group}-{number:05d}.tar", group, tracklets, digest.hexdigest(), inputs.hexdigest(), metas)


# ----------------------------------------------------------------------------------------------------------
# Writing one shard (runs in a worker process)
# ----------------------------------------------------------------------------------------------------------

_frames_done = None  # shared counter for the progress bar, set in each worker by _init_worker


def _init_worker(counter) -> None:
    global _frames_done
    _frames_done = counter


def _init_pool_worker(counter) -> None:
    # Ctrl-C reaches the whole process group: only the parent handles it (and terminates the pool), so a
    # worker prints no traceback; SIGTERM (how the pool terminates workers) kills at once, whatever handler the
    # parent installed. A worker also dies with its parent, even a SIGKILLed one (Linux).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    _init_worker(counter)


_ZEROS = bytes(BLOCK)  # padding to whole blocks is a slice of this


class _Discard:
    """Where a shard that is only checked goes (its bytes are hashed, never written)."""

    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError("no file")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def write_shard(job: ShardJob, out_dir: str, skip_bad: bool, expect_sha256: str | None = None,
                check_only: bool = False) -> dict:
    """Write one shard and its index atomically; return its record.

    With `expect_sha256` (repairing a finished dataset), the shard is put in place only if its bytes come out
    exactly as recorded; otherwise nothing is changed and the record returned says {"mismatch": True}.
    `check_only` (with `expect_sha256`: an intact shard whose frames have new times): the bytes are only hashed;
    if they are the recorded ones, the record (with the new input fingerprint) is saved and the shard and its
    index are left as they are, so that a job reading them is never disturbed.
    """
    work = records_dir(out_dir)
    tmp = work / f"{job.name}.{os.getpid()}.tmp"
    samples: list[list[IndexedMember]] = []
    written, skipped, used = [], [], set()
    offset = 0
    try:
        digest = hashlib.sha256()
        with (_Discard() if check_only else open(tmp, "wb")) as f:
            for t, meta in zip(job.tracklets, job.metas):
                frames, problem = [], None
                for path, size in zip(t.frames, t.sizes):
                    data, problem = read_frame_file(path, size)
                    problem = problem or frame_problem(data, path)
                    if problem:
                        break
                    frames.append(data)
                if problem:
                    if not skip_bad:
                        raise PrepareError(problem)
                    skipped.append({"key": t.key, "group": t.group, "reason": problem})
                    continue
                # One chunk per tracklet: header + data + padding of its JSON member, then of each frame.
                exts = [frame_ext(data) for data in frames]  # the frames' own formats: never re-encoded
                used.update(exts)
                names = [f"{t.key}.json"] + [frame_member(t.key, i, ext) for i, ext in enumerate(exts)]
                parts, members, skip = [], [], len(t.key) + 1
                for name, data in zip(names, [meta] + frames):
                    size = len(data)
                    pad = padded(size) - size
                    members.append(IndexedMember(name[skip:], offset + BLOCK, size, name))
                    parts += (tar_header(name, size), data, _ZEROS[:pad])
                    offset += BLOCK + size + pad
                chunk = b"".join(parts)
                f.write(chunk)
                digest.update(chunk)
                samples.append(members)
                written.append(t.key)
                if _frames_done is not None:
                    with _frames_done.get_lock():
                        _frames_done.value += len(frames)
            f.write(TAR_END)
            digest.update(TAR_END)
            f.flush()
            if not check_only:
                os.fsync(f.fileno())
        sha256 = digest.hexdigest()
        if not samples:
            raise PrepareError(f"{job.name}: every tracklet of this shard was skipped as bad; see the messages above")
        if expect_sha256 is not None and sha256 != expect_sha256:
            tmp.unlink(missing_ok=True)
            return {"name": job.name, "mismatch": True}
        index = format_index(samples)
        record = {"name": job.name, "index": job.index_name, "group": job.group, "plan_sha256": job.fingerprint,
                  "inputs_sha256": job.inputs, "sha256": sha256, "bytes": offset + len(TAR_END),
                  "index_sha256": hashlib.sha256(index.encode()).hexdigest(), "num_tracklets": len(samples),
                  "num_frames": sum(len(s) - 1 for s in samples), "keys": written, "skipped": skipped,
                  "exts": sorted(used)}
        # The record first: then every shard under its final name is one that a record of ours names.
        save_record(out_dir, record)
        if not check_only:
            os.replace(tmp, os.path.join(out_dir, job.name))
            atomic_write(os.path.join(out_dir, job.index_name), index, tmp_dir=work)
    except OSError as e:
        if e.filename is None:  # a failed write() names no file: name the shard
            e.filename = str(tmp)
        tmp.unlink(missing_ok=True)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


def shard_intact(record: dict, out_dir: str) -> bool:
    """The shard and index that `record` describes are in place, with the recorded sizes and sha256."""
    tar, idx = os.path.join(out_dir, record["name"]), os.path.join(out_dir, record["index"])
    if not (os.path.isfile(tar) and os.path.isfile(idx)) or os.path.getsize(tar) != record["bytes"]:
        return False
    return (hashlib.sha256(Path(idx).read_bytes()).hexdigest() == record["index_sha256"]
            and sha256_file(tar) == record["sha256"])


def _intact_star(args) -> bool:
    return shard_intact(*args)


def check_intact(records: list[dict], out_dir: str, workers: int) -> list[bool]:
    """shard_intact for each record, read by up to `workers` processes."""
    if workers <= 1 or len(records) <= 1:
        return [shard_intact(r, out_dir) for r in records]
    with mp.get_context("fork").Pool(min(workers, len(records)), initializer=_init_pool_worker,
                                     initargs=(None,)) as pool:
        return pool.map(_intact_star, [(r, out_dir) for r in records])


def run_jobs(jobs: list[ShardJob], out_dir: str, skip_bad: bool, workers: int, total_frames: int,
             done_frames: int, expect: dict[str, str] | None = None, check_only: frozenset = frozenset()) -> list[dict]:
    """write_shard for every job, by up to `workers` processes, with a progress bar over all frames; `expect`
    and `check_only` as write_shard's, per shard name."""
    from tqdm import tqdm

    expect = expect or {}
    counter = mp.get_context("fork").Value("q", 0)
    # This process reads the count without the counter's lock: Ctrl-C terminates the pool with SIGTERM, and a
    # worker killed inside `with get_lock()` leaves that lock held forever (the progress thread, then the
    # interrupted run, would hang on it). An aligned 64-bit read is whole; a count one update behind is harmless.
    frames_done = counter.get_obj()
    bar = tqdm(total=total_frames, initial=done_frames, unit="frame", unit_scale=True, desc="prepare",
               disable=None, file=sys.stderr, smoothing=0.1)
    stop = threading.Event()

    def refresh():  # the workers count frames in shared memory; the bar follows from this thread
        while not stop.wait(0.25):
            bar.n = done_frames + frames_done.value
            bar.refresh()

    thread = threading.Thread(target=refresh, daemon=True)
    thread.start()
    try:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker(counter)
            return [write_shard(job, out_dir, skip_bad, expect.get(job.name), job.name in check_only) for job in jobs]
        with mp.get_context("fork").Pool(min(workers, len(jobs)), initializer=_init_pool_worker,
                                         initargs=(counter,)) as pool:
            async_results = [pool.apply_async(write_shard, (job, out_dir, skip_bad, expect.get(job.name),
                                                            job.name in check_only)) for job in jobs]
            return [r.get() for r in async_results]
    finally:
        _init_worker(None)
        stop.set()
        thread.join()
        bar.n = done_frames + frames_done.value
        bar.close()


def build_manifest(dataset: str, jobs: list[ShardJob], records: dict[str, dict], scan_skipped: list[dict],
                   extra: dict | None = None) -> dict:
    """The manifest of the finished shards; `extra`: dataset fields beside the splits (iLIDS-VID's and PRID-2011's
    person_splits and their source). The version is the lowest that describes the dataset (stenvan.shards)."""
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
    splits = {name: {"tracklets": []} for name in split_names(dataset)}
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
    # Records of an earlier stenvan (before PNG members) hold JPEG frames only.
    exts = {ext for job in jobs for ext in records[job.name].get("exts", ["jpg"])}
    return seal_manifest({"format": FORMAT_NAME, "version": manifest_version(dataset, exts), "dataset": dataset,
                          "writer": f"stenvan {__version__}", "shards": shards, "splits": splits, "skipped": skipped,
                          **(extra or {})})

"""Synthetic datasets written in the exact on-disk layouts of MARS, DukeMTMC-VideoReID (design §2), iLIDS-VID,
PRID-2011 and LS-VID (prepare/synthetic_layouts.py).

    python -m prepare synthetic --layout {mars,dukev,ilidsvid,prid2011,lsvid} --out DIR --ids N --seed S
                                [--min-len A --max-len B]
    python -m prepare synthetic --layout mars --out DIR --real-sizes [--scale F --test-scale F] --workers 16

The tree is what `prepare mars` / `prepare dukev` read for the real datasets, so tests and the demo exercise
the real code paths. The plan (`synthetic_plan.py`) fixes every tracklet first; workers then render
identities in parallel, each tracklet from its own seed, so the bytes depend on the options and the seed,
never on `--workers`. Among the tracklets of each split there is always one of exactly `min_len` frames and
one of exactly `max_len` frames, so the extremes are always exercised. The output appears whole or not at
all (`synthetic_output.py`).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from prepare.matfile import mat_bytes
from prepare.render import TrackletRenderer, encode_jpeg, encode_png, random_camera, random_identity
from prepare.synthetic_output import PartialFolder, existing_result
from prepare.synthetic_plan import (Plan, TrackPlan, add_dukev_quirks, frame_name, mars_name, plan_dukev_ids,
                                    plan_dukev_sized, plan_mars_ids, plan_mars_sized, rng_for)
from prepare.synthetic_sizes import SplitSizes, check

NEW_LAYOUTS = ("ilidsvid", "prid2011", "lsvid")  # iLIDS-VID and PRID-2011 frames are PNG, the rest JPEG
PNG_LAYOUTS = ("ilidsvid", "prid2011")

GENERATOR_VERSION = 1  # bump when the same options start giving other bytes: finished trees are then stale
UNIT_FRAMES = 2000  # frames per work unit (an identity, or a slice of 0000 / 00-1): small enough to balance
DISK_BYTES_PER_FILE = 8192  # a ~7 KB JPEG takes two 4 KiB blocks


def generate(layout: str, out: str | os.PathLike, num_ids: int | None = None, seed: int = 0,
             min_len: int | None = None, max_len: int | None = None, *, sizes: SplitSizes | None = None,
             workers: int = 1, quirk_f0002: float = 0.0, quirk_old_names: float = 0.0,
             progress: bool = True, real_sizes: bool = False) -> dict:
    """Write a synthetic dataset tree into `out` (new or empty) and return its counts.

    Either `num_ids` (small datasets, min/max length default 2/120) or exact `sizes` (min/max length from
    the sizes unless given). `quirk_*`: fractions of DukeV tracklets that start at F0002 / use the older
    `0001C6F0099X30823.jpg` names. `real_sizes`: the real counts of iLIDS-VID, PRID-2011 or LS-VID (MARS and
    DukeV take `sizes`). Rerunning with the same options into a finished tree is a no-op.
    """
    plan, options = make_plan(layout, num_ids, seed, min_len, max_len, sizes, quirk_f0002, quirk_old_names,
                              real_sizes)
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    out = Path(os.path.abspath(out))
    done = existing_result(out, options)
    if done is not None:
        return {**done, "up_to_date": True, "seconds": 0.0, "frames_per_s": 0.0, "workers": workers}
    _warn_if_no_room(out, plan)
    with PartialFolder(out) as partial:
        done = existing_result(out, options)  # another run may have finished it while we waited for the lock
        if done is not None:
            partial.discard()
            return {**done, "up_to_date": True, "seconds": 0.0, "frames_per_s": 0.0, "workers": workers}
        try:
            start = time.perf_counter()
            nbytes = _write_tree(partial, plan, seed, workers, progress)
            counts = _counts(plan, nbytes)
            partial.commit({"generator": "stenvan prepare synthetic", "options": options, "counts": counts})
        except BaseException:
            partial.discard()  # nothing half-written stays behind (Ctrl-C, full disk, a worker's error)
            raise
    seconds = time.perf_counter() - start
    return {**counts, "up_to_date": False, "seconds": seconds, "frames_per_s": counts["frames"] / max(seconds, 1e-9),
            "workers": workers}


def make_plan(layout: str, num_ids: int | None, seed: int, min_len: int | None, max_len: int | None,
              sizes: SplitSizes | None, quirk_f0002: float = 0.0, quirk_old_names: float = 0.0,
              real_sizes: bool = False) -> tuple[Plan, dict]:
    """Validate the options and plan every tracklet; returns the plan and the options as recorded."""
    if layout in NEW_LAYOUTS:
        return _plan_new_layout(layout, num_ids, seed, min_len, max_len, sizes, real_sizes, quirk_f0002 or
                                quirk_old_names)
    if layout not in ("mars", "dukev"):
        raise ValueError(f"--layout must be one of mars, dukev, {', '.join(NEW_LAYOUTS)}; got {layout!r}")
    if real_sizes:
        raise ValueError("real_sizes is for iLIDS-VID, PRID-2011 and LS-VID; MARS and DukeV take sizes")
    for name, value in (("--quirk-f0002", quirk_f0002), ("--quirk-old-names", quirk_old_names)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} is a fraction of the tracklets, between 0 and 1; got {value}")
        if value and layout != "dukev":
            raise ValueError(f"{name} reproduces a quirk of the distributed DukeV; it needs --layout dukev")
    shift = 1 if quirk_f0002 else 0
    options = {"layout": layout, "seed": seed, "version": GENERATOR_VERSION}
    if sizes is not None:
        if num_ids is not None:
            raise ValueError("--ids and split sizes exclude each other: give one or the other")
        sizes = SplitSizes(**{**sizes.as_dict(), **({"min_len": min_len} if min_len is not None else {}),
                              **({"max_len": max_len} if max_len is not None else {})})
        check(layout, sizes, shift)
        plan = (plan_mars_sized if layout == "mars" else plan_dukev_sized)(sizes, seed)
        options["sizes"] = sizes.as_dict()
    else:
        num_ids = 60 if num_ids is None else num_ids
        min_len, max_len = 2 if min_len is None else min_len, 120 if max_len is None else max_len
        if num_ids < 4:
            raise ValueError("--ids must be at least 4 (two train and two test identities)")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= --min-len <= --max-len, got {min_len} and {max_len}")
        if layout == "mars" and max_len > 999:
            raise ValueError("--max-len: MARS frame numbers have 3 digits, so tracklets hold at most 999 frames")
        if layout == "dukev" and max_len > 9999 - shift:
            raise ValueError(f"--max-len: DukeV frame indices have 4 digits, so tracklets hold at most "
                             f"{9999 - shift:,} frames here")
        plan = (plan_mars_ids if layout == "mars" else plan_dukev_ids)(num_ids, seed, min_len, max_len)
        options.update(num_ids=num_ids, min_len=min_len, max_len=max_len)
    if layout == "dukev":
        add_dukev_quirks(plan, seed, quirk_f0002, quirk_old_names)
        options.update(quirk_f0002=quirk_f0002, quirk_old_names=quirk_old_names)
    return plan, options


def _plan_new_layout(layout: str, num_ids: int | None, seed: int, min_len: int | None, max_len: int | None,
                     sizes: SplitSizes | None, real_sizes: bool, quirks: float) -> tuple[Plan, dict]:
    from prepare.synthetic_layouts import ILIDS_REAL, LSVID_REAL, PRID_REAL, plan_ilidsvid, plan_lsvid, plan_prid2011

    if sizes is not None or quirks:
        raise ValueError(f"--layout {layout} takes --ids or --real-sizes (with --min-len/--max-len); the size options "
                         "and DukeV quirks are for mars and dukev")
    if real_sizes and num_ids is not None:
        raise ValueError("--ids and --real-sizes exclude each other: give one or the other")
    real = {"ilidsvid": ILIDS_REAL, "prid2011": PRID_REAL, "lsvid": LSVID_REAL}[layout]
    default_min, default_max = (real["min_len"], real["max_len"]) if real_sizes else (2, 120)
    min_len = default_min if min_len is None else min_len
    max_len = default_max if max_len is None else max_len
    num_ids = None if real_sizes else (60 if num_ids is None else num_ids)
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= --min-len <= --max-len, got {min_len} and {max_len}")
    if max_len > 9999:
        raise ValueError(f"--max-len: {layout} frame numbers have 4 digits here, so tracklets hold at most 9,999 "
                         "frames")
    if num_ids is not None and num_ids < (6 if layout == "lsvid" else 4):
        raise ValueError(f"--ids must be at least {6 if layout == 'lsvid' else 4} for {layout}")
    planner = {"ilidsvid": plan_ilidsvid, "prid2011": plan_prid2011, "lsvid": plan_lsvid}[layout]
    plan = planner(num_ids or 0, seed, min_len, max_len, real=real_sizes)
    options = {"layout": layout, "seed": seed, "version": GENERATOR_VERSION, "min_len": min_len, "max_len": max_len,
               **({"real_sizes": True} if real_sizes else {"num_ids": num_ids})}
    return plan, options


def _counts(plan: Plan, nbytes: int) -> dict:
    counts = {"frames": plan.frames, "files": plan.files, "bytes": nbytes, "train_tracklets": len(plan.train)}
    if plan.layout in NEW_LAYOUTS:
        counts.update(persons=len({(t.person, t.pid) for t in plan.train}))
    elif plan.layout == "mars":
        counts.update(test_tracklets=len(plan.test), queries=len(plan.queries))
    else:
        counts.update(gallery_tracklets=len(plan.test), queries=sum(len(t.folders) > 1 for t in plan.test))
    return counts


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------

def _write_tree(partial: PartialFolder, plan: Plan, seed: int, workers: int, show: bool) -> int:
    """Render every frame into the partial folder (in `workers` processes) and write the MARS info files;
    returns the bytes of the distinct frames."""
    root = str(partial.path)
    jobs = [(root, seed, plan.layout, unit) for unit in _units(plan)]
    bar = Progress(f"synthetic {plan.layout}", plan.frames, show)
    nbytes = 0
    try:
        if workers == 1:
            write_info(partial.path, plan)
            for job in jobs:
                frames, size = _render_unit(job)
                nbytes += size
                bar.update(frames)
            return nbytes
        with mp.get_context("fork").Pool(min(workers, len(jobs)), initializer=_init_worker,
                                         initargs=(os.getpid(),)) as pool:
            results = pool.imap_unordered(_render_unit, jobs)  # the workers start now ...
            write_info(partial.path, plan)  # ... while this process writes the name lists
            for frames, size in results:
                nbytes += size
                bar.update(frames)
        return nbytes
    finally:
        bar.close()


def _units(plan: Plan) -> list[list[TrackPlan]]:
    """Tracklets grouped by identity folder, cut at ~UNIT_FRAMES (never inside a tracklet), largest first so
    that the long identities start early and the pool ends evenly. The order changes no byte."""
    units, current, frames, key = [], [], 0, None
    for t in plan.tracks:
        k = (t.folders[0].split("/")[0], t.pid)
        if current and (k != key or frames >= UNIT_FRAMES):
            units.append(current)
            current, frames = [], 0
        current.append(t)
        frames += t.length
        key = k
    if current:
        units.append(current)
    return sorted(units, key=lambda u: -sum(t.length for t in u))


def _init_worker(parent: int) -> None:
    # The output lock names the parent; a worker dies with its parent (PR_SET_PDEATHSIG = 1), so a killed run
    # leaves no process writing into the folder the next run takes over and clears; Ctrl-C is the parent's job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still ends the workers
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _render_unit(job) -> tuple[int, int]:
    """Render and write one unit's tracklets; returns (frames, bytes)."""
    root, seed, layout, tracks = job
    cameras: dict[int, object] = {}
    frames = nbytes = 0
    for t in tracks:
        if t.camid not in cameras:
            cameras[t.camid] = random_camera(rng_for(seed, 1, t.camid))
        person = random_identity(rng_for(seed, 2, t.person + 1000))
        renderer = TrackletRenderer(person, cameras[t.camid], rng_for(seed, 4, t.ordinal), size=t.size)
        folders = [os.path.join(root, f) for f in t.folders]
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
        for i in range(t.length):
            data = encode_png(renderer.frame(i)) if layout in PNG_LAYOUTS else encode_jpeg(renderer.frame(i))
            name = frame_name(layout, t, i)
            for folder in folders:
                fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            nbytes += len(data)
        frames += t.length
    return frames, nbytes


def _track_table(tracks: list[TrackPlan]) -> np.ndarray:
    """[start, end, pid, camera] rows, 1-based inclusive line numbers into the name list."""
    rows, start = [], 1
    for t in tracks:
        rows.append([start, start + t.length - 1, t.pid, t.camid])
        start += t.length
    return np.array(rows, dtype=np.int32).reshape(-1, 4)


def write_info(root: Path, plan: Plan) -> None:
    """MARS's info/ folder: name lists (streamed, CRLF like the original) and the three .mat files; the split and
    query files of iLIDS-VID, PRID-2011 and LS-VID."""
    if plan.layout in NEW_LAYOUTS:
        from prepare.synthetic_layouts import write_meta

        write_meta(root, plan)
        return
    if plan.layout != "mars":
        return
    info = root / "info"
    info.mkdir(parents=True, exist_ok=True)
    for fname, tracks in (("train_name.txt", plan.train), ("test_name.txt", plan.test)):
        with open(info / fname, "wb") as f:
            for t in tracks:
                f.write("".join(mars_name(t.pid, t.camid, t.number, i + 1) + "\r\n"
                                for i in range(t.length)).encode("ascii"))
    (info / "tracks_train_info.mat").write_bytes(mat_bytes("track_train_info", _track_table(plan.train)))
    (info / "tracks_test_info.mat").write_bytes(mat_bytes("track_test_info", _track_table(plan.test)))
    (info / "query_IDX.mat").write_bytes(mat_bytes("query_IDX", np.array([plan.queries], dtype=np.uint16)))


def _warn_if_no_room(out: Path, plan: Plan) -> None:
    """One line if the filesystem looks too small; a full disk mid-run is still caught (and cleaned up)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    need = plan.files * DISK_BYTES_PER_FILE
    st = os.statvfs(probe)
    free, inodes = st.f_bavail * st.f_frsize, st.f_favail
    if free < need or (st.f_files and inodes < plan.files):
        print(f"synthetic: warning: {probe} has {free / 1e9:.1f} GB and {inodes:,} inodes free; this dataset needs "
              f"about {need / 1e9:.1f} GB and {plan.files:,} files", file=sys.stderr)


class Progress:
    """A progress bar with frames/s on a terminal; elsewhere (a log file) a plain line every `every_s`."""

    def __init__(self, desc: str, total: int, enabled: bool = True, every_s: float = 10.0):
        self.desc, self.total, self.enabled, self.every_s = desc, total, enabled, every_s
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="frame", unit_scale=True, file=sys.stderr)

    def update(self, frames: int) -> None:
        self.done += frames
        if self.bar is not None:
            self.bar.update(frames)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / max(rate, 1e-9)
        return (f"{self.desc}: {self.done:,}/{self.total:,} frames ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:,.0f} frames/s, ~{left:.0f} s left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


"""Throughput of `prepare` against I/O ceilings on the same frames: one sequential stream and `tar cf`.

    python -m benchmarks.prepare [--data MARS_DIR] [--ids 120] [--workers CORES] [--shard-size 256MB] [--repeats 3]

Without --data a synthetic MARS tree is generated first. Every variant reads the same frame files with a warm
page cache (one untimed warm-up pass, then one untimed round of every variant), starts after an untimed
`sync` (no dirty pages left by the variant before) and writes into the same folder:
- `stream`: the I/O ceiling for prepare's job: one process reads every frame file (in prepare's order) and
  writes all their bytes, back to back, to one file, fsynced at the end (prepare fsyncs every shard).
- `tar`: `tar cf` of the raw `bbox_train/` and `bbox_test/` folders (headers and padding like a shard), then
  one fsync of the archive.
- `copy_files`: one new file per frame (what `cp -r` does; the old baseline, for comparison).
- `scan`: only prepare's reading of the dataset's layout (name lists, info files, a stat of every frame),
  which the ceilings above get for free; it is part of `prepare`.
- `prepare`: the scan, then `prepare_dataset` with `--workers`, writing shards, indexes, records and the
  manifest; the JPEG check, the sha256 of every shard and the fsyncs included.
- `prepare_rerun`: the same prepare again on its finished output (a verified no-op: every shard re-hashed).
Ratios are frames/s relative to `stream`, measured in the same run. The target is prepare >= 0.5x stream.
On a 2-core machine with 256 MB shards: 0.59-0.64x with 2 workers (the default there), 0.47-0.49x with
`--workers 1` (the sha256 of every shard, the fsyncs and the JPEG check are what one process adds to the stream).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import append_results, device_name, print_table, summarize, versions
from prepare.cli import byte_size


def _copy_files(pairs: list[tuple[str, str]]) -> None:
    for src, dst in pairs:
        with open(src, "rb") as f:
            data = f.read()
        with open(dst, "wb") as f:
            f.write(data)


def copy_files(files: list[str], root: Path, dest: Path, workers: int) -> None:
    for d in {os.path.dirname(f) for f in files}:
        (dest / os.path.relpath(d, root)).mkdir(parents=True, exist_ok=True)
    pairs = [(f, str(dest / os.path.relpath(f, root))) for f in files]
    if workers == 1:
        _copy_files(pairs)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_copy_files, [pairs[i::workers] for i in range(workers)])


def stream(files: list[str], dest: Path) -> None:
    dest.mkdir(parents=True)
    with open(dest / "all.bin", "wb", buffering=1 << 20) as out:
        for path in files:
            with open(path, "rb") as f:
                out.write(f.read())
        out.flush()
        os.fsync(out.fileno())


def tar_cf(data: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    subprocess.run(["tar", "cf", str(dest / "raw.tar"), "-C", str(data), "bbox_train", "bbox_test"], check=True)
    fd = os.open(dest / "raw.tar", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def frames_in_prepare_order(data: Path) -> list[str]:
    from prepare.mars import scan_mars

    tracklets, _ = scan_mars(str(data), str(data / "info"))
    return [f for t in tracklets for f in t.frames]


def run_prepare(data: Path, out: Path, workers: int, shard_bytes: int) -> None:
    from prepare.build import prepare_dataset
    from prepare.mars import scan_mars

    tracklets, skipped = scan_mars(str(data), str(data / "info"))
    prepare_dataset("mars", tracklets, skipped, str(out), str(data), shard_bytes, workers)


VARIANTS = ("stream", "tar", "copy_files", "scan", "prepare", "prepare_rerun")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="a MARS-layout tree (default: generate a synthetic one)")
    parser.add_argument("--ids", type=int, default=120, help="identities of the generated tree")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="prepare's (and copy_files') processes (default: this machine's cores, at most 8, as "
                             "a user runs prepare; the stream and tar ceilings are one process each)")
    parser.add_argument("--shard-size", type=byte_size, default=byte_size("256MB"),
                        help="prepare's shard size (more shards than workers let the workers share the work)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", ".")) as tmp:
        tmp = Path(tmp)
        data, extra = args.data, []
        if data is None:
            from prepare.synthetic import generate

            data = tmp / "mars"
            counts = generate("mars", data, num_ids=args.ids, seed=0, min_len=2, max_len=120)
            print(f"generated {counts['frames']:,} synthetic frames at {counts['frames_per_s']:,.0f} frames/s "
                  "(one core)")
            extra.append({"variant": "synthetic_generate", "frames": counts["frames"],
                          "frames_per_s": counts["frames_per_s"], "median_s": counts["seconds"], "repeats": 1})
        files = frames_in_prepare_order(data)
        total_bytes = sum(os.path.getsize(f) for f in files)
        _copy_files([(f, os.devnull) for f in files])  # warm-up: every variant reads from the page cache

        timings: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats + 1):  # the first round warms up and is not counted
            for variant in VARIANTS:
                out = tmp / f"{variant}-{r}"
                if variant == "prepare_rerun":
                    out = tmp / f"prepare-{r}"  # the output prepare just finished
                os.sync()  # no variant pays for flushing what the one before it wrote (untimed)
                start = time.perf_counter()
                if variant == "stream":
                    stream(files, out)
                elif variant == "tar":
                    tar_cf(data, out)
                elif variant == "copy_files":
                    copy_files(files, data, out, args.workers)
                elif variant == "scan":
                    frames_in_prepare_order(data)
                else:
                    run_prepare(data, out, args.workers, args.shard_size)
                elapsed = time.perf_counter() - start
                if r:
                    timings[variant].append(elapsed)
                if variant not in ("prepare", "scan"):
                    shutil.rmtree(out)

    device = device_name("cpu")
    rows, results = [], [{**row, "device": device, "versions": versions()} for row in extra]
    stream_fps = len(files) / summarize(timings["stream"])["median_s"]
    for variant in VARIANTS:
        stats = summarize(timings[variant])
        fps = len(files) / stats["median_s"]
        ratio = fps / stream_fps
        rows.append([variant, len(files), stats["median_s"], stats["min_s"], stats["max_s"], fps,
                     total_bytes / stats["median_s"] / 1e6, ratio])
        results.append({"variant": variant, "device": device, "versions": versions(), "workers": args.workers,
                        "shard_bytes": args.shard_size,
                        "frames": len(files), "bytes": total_bytes, "frames_per_s": fps,
                        "mb_per_s": total_bytes / stats["median_s"] / 1e6, "ratio_to_stream": ratio, **stats})
    print_table(["variant", "frames", "median_s", "min_s", "max_s", "frames_per_s", "MB_per_s", "vs_stream"], rows,
                title=f"prepare vs I/O ceilings, {args.workers} worker(s), shards of {args.shard_size:,} bytes, "
                      f"{device}, warm page cache, {total_bytes / 1e6:,.1f} MB of frames")
    print(f"results appended to {append_results('prepare', results)}")


if __name__ == "__main__":
    main()

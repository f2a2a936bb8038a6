"""Throughput of `prepare` against a plain copy of the same JPEG files (the I/O ceiling).

    python -m benchmarks.prepare [--data MARS_DIR] [--ids 120] [--workers 1] [--repeats 3]

Without --data a synthetic MARS tree is generated first. Both variants read the same files with a warm page
cache (one untimed warm-up pass first) and use the same number of processes; the copy writes each file to a
new file in a mirror tree (what `cp -r` does), prepare writes shards + indexes + manifest.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import append_results, device_name, print_table, summarize, versions


def _copy_files(pairs: list[tuple[str, str]]) -> None:
    for src, dst in pairs:
        with open(src, "rb") as f:
            data = f.read()
        with open(dst, "wb") as f:
            f.write(data)


def plain_copy(files: list[str], root: Path, dest: Path, workers: int) -> None:
    for d in {os.path.dirname(f) for f in files}:
        (dest / os.path.relpath(d, root)).mkdir(parents=True, exist_ok=True)
    pairs = [(f, str(dest / os.path.relpath(f, root))) for f in files]
    chunks = [pairs[i::workers] for i in range(workers)]
    if workers == 1:
        _copy_files(pairs)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_copy_files, chunks)


def run_prepare(data: Path, out: Path, workers: int) -> None:
    from prepare.mars import scan_mars
    from prepare.writer import prepare_dataset

    tracklets, skipped = scan_mars(str(data), str(data / "info"))
    prepare_dataset("mars", tracklets, skipped, str(out), str(data), 256 * 10**6, workers)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="a MARS-layout tree (default: generate a synthetic one)")
    parser.add_argument("--ids", type=int, default=120, help="identities of the generated tree")
    parser.add_argument("--workers", type=int, default=1)
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
        files = sorted(str(p) for p in data.glob("bbox_*/*/*.jpg"))
        total_bytes = sum(os.path.getsize(f) for f in files)
        _copy_files([(f, os.devnull) for f in files])  # warm-up: both variants read from the page cache

        timings: dict[str, list[float]] = {"copy": [], "prepare": []}
        for r in range(args.repeats + 1):  # the first round warms up and is not counted
            for variant in ("copy", "prepare"):
                out = tmp / f"{variant}-{r}"
                start = time.perf_counter()
                if variant == "copy":
                    plain_copy(files, data, out, args.workers)
                else:
                    run_prepare(data, out, args.workers)
                elapsed = time.perf_counter() - start
                if r:
                    timings[variant].append(elapsed)
                shutil.rmtree(out)

    device = device_name("cpu")
    rows, results = [], [{**row, "device": device, "versions": versions()} for row in extra]
    copy_fps = len(files) / summarize(timings["copy"])["median_s"]
    for variant in ("copy", "prepare"):
        stats = summarize(timings[variant])
        fps = len(files) / stats["median_s"]
        ratio = fps / copy_fps
        rows.append([variant, len(files), stats["median_s"], fps, total_bytes / stats["median_s"] / 1e6, ratio])
        results.append({"variant": variant, "device": device, "versions": versions(), "workers": args.workers,
                        "frames": len(files), "bytes": total_bytes, "frames_per_s": fps,
                        "mb_per_s": total_bytes / stats["median_s"] / 1e6, "ratio_to_copy": ratio, **stats})
    print_table(["variant", "frames", "median_s", "frames_per_s", "MB_per_s", "vs_copy"], rows,
                title=f"prepare vs plain copy, {args.workers} worker(s), {device}, warm page cache")
    print(f"results appended to {append_results('prepare', results)}")


if __name__ == "__main__":
    main()

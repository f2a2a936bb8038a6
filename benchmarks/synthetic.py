"""Throughput of the synthetic generator per worker count, and the projected time for full MARS.

    python -m benchmarks.synthetic [--layout mars] [--scale 0.01] [--workers 1 2] [--repeats 3]

Each run writes a MARS-shaped tree (the real split sizes times --scale: the same length distribution, the
same identity folders) into a temporary folder (BENCH_TMP or .), timed end to end: planning, rendering,
JPEG encoding, file writes, name lists and the final rename. The serial part (planning and the name lists of
the full-size dataset, done by the main process) is timed once at full size. The projection for full MARS on
16 cores is given two ways, both projections, not measurements: from the CPU time per frame (what a worker
on a dedicated core does: meaningful on a shared machine, where a worker gets less than a core) and, more
pessimistically, from the wall-clock rate per worker of each run; both add the measured serial part. The
machine's load average is recorded beside every figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import append_results, device_name, print_table, summarize, versions


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def serial_seconds(layout: str) -> float:
    """Planning + the MARS info files at the real sizes: the part the main process does alone."""
    from prepare.synthetic import write_info, make_plan
    from prepare.synthetic_sizes import REAL

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", ".")) as tmp:
        start = time.perf_counter()
        plan, _ = make_plan(layout, None, 0, None, None, REAL[layout])
        write_info(Path(tmp), plan)
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=("mars", "dukev"), default="mars")
    parser.add_argument("--scale", type=float, default=0.01, help="fraction of the real split sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--project-workers", type=int, default=16, help="worker count of the projection")
    args = parser.parse_args(argv)

    from prepare.synthetic import generate
    from prepare.synthetic_sizes import REAL, scaled

    sizes = scaled(args.layout, REAL[args.layout], args.scale)
    full_frames = REAL[args.layout].train_frames + REAL[args.layout].test_frames
    serial_s = serial_seconds(args.layout)
    device, rows, results = device_name("cpu"), [], []
    for workers in args.workers:
        timings, loads, cpu = [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", ".")) as tmp:
                loads.append(os.getloadavg()[0])
                cpu_start = cpu_seconds()
                counts = generate(args.layout, Path(tmp) / "data", sizes=sizes, workers=workers, progress=False)
                cpu.append(cpu_seconds() - cpu_start)
                timings.append(counts["seconds"])
                shutil.rmtree(Path(tmp) / "data")
        stats = summarize(timings)
        fps = counts["frames"] / stats["median_s"]
        per_worker = fps / workers
        per_cpu_s = counts["frames"] / sorted(cpu)[len(cpu) // 2]  # frames per CPU-second (median run)
        projected_s = serial_s + full_frames / (per_cpu_s * args.project_workers)
        pessimistic_s = serial_s + full_frames / (per_worker * args.project_workers)
        bytes_per_frame = counts["bytes"] / counts["frames"]
        rows.append([workers, counts["frames"], stats["median_s"], fps, per_worker, per_cpu_s, bytes_per_frame / 1e3,
                     max(loads), projected_s, pessimistic_s])
        results.append({"variant": f"{args.layout}_{workers}w", "device": device, "versions": versions(),
                        "layout": args.layout, "scale": args.scale, "workers": workers, "frames": counts["frames"],
                        "bytes_per_frame": bytes_per_frame, "frames_per_s": fps, "frames_per_s_per_worker": per_worker,
                        "frames_per_cpu_s": per_cpu_s,
                        "load_avg_1m_max": max(loads), "cpu_count": os.cpu_count(), "serial_s_full": serial_s,
                        "projected_full_s": projected_s, "projected_full_s_from_wall": pessimistic_s,
                        "projected_workers": args.project_workers,
                        "full_frames": full_frames, **stats})
    print_table(["workers", "frames", "median_s", "frames_per_s", "per_worker", "per_cpu_s", "KB_per_frame",
                 "load_1m", f"full_{args.project_workers}w_s*", "from_wall_s*"], rows,
                title=f"synthetic {args.layout} generator, {args.scale:g} x real sizes, {device}")
    print(f"* projections, not measurements: {full_frames:,} frames at the frames per CPU-second (full_) or the "
          f"wall-clock rate per worker (from_wall_) x {args.project_workers} workers, plus {serial_s:.1f} s of "
          "serial planning and name lists (measured)")
    print(f"results appended to {append_results('synthetic', results)}")


if __name__ == "__main__":
    main()

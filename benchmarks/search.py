"""Gallery search at scale: top-k of queries against 100,000 gallery tracklets, chunked on the device.

    python -m benchmarks.search [--gallery 100000 --queries 1000 --k 10] [--device cuda]

Random 2048-d float32 features (the search cost does not depend on their values). Reports wall time and the
peak memory the search adds on top of the features already in memory: on the CPU the process's peak resident
set (VmHWM, reset before the search through /proc/self/clear_refs), on a GPU torch's peak allocation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import append_results, device_name, print_table, versions
from stenvan.inference.search import BLOCK_FLOATS, top_k


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((args.gallery, args.dim), dtype=np.float32)
    query = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        before = _rss_bytes("VmRSS")
    start = time.perf_counter()
    idx, _ = top_k(query, gallery, args.k, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_bytes("VmHWM")) - before
    row = {"variant": f"top-{args.k}", "gallery": args.gallery, "queries": args.queries, "seconds": seconds,
           "queries_per_s": args.queries / seconds, "features_mib": gallery.nbytes / 2**20,
           "peak_extra_mib": peak / 2**20, "block_mib": BLOCK_FLOATS * 4 / 2**20}
    print_table(["gallery", "queries", "k", "seconds", "queries/s", "gallery features MiB", "peak extra MiB"],
                [[args.gallery, args.queries, args.k, seconds, row["queries_per_s"], row["features_mib"],
                  row["peak_extra_mib"]]], title=f"search, {device_name(args.device)}")
    append_results("search", [{"device": device_name(args.device), "versions": versions(), **row}])


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmarks: timing statistics, environment facts and the results files.

Every benchmark prints a table and appends one JSON object per measured variant to
`benchmarks/results/<benchmark>.jsonl` with the benchmark name, the variant, the device and the versions.
`STENVAN_BENCH_RESULTS=DIR` sends them to DIR/<benchmark>.jsonl instead (what `make gpu-check`'s CPU smoke mode
does, so that trial runs never mix with the committed figures).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the committed results
RESULTS_ENV = "STENVAN_BENCH_RESULTS"  # another results folder, for runs whose figures must not be committed


def results_dir() -> Path:
    """Where append_results writes: $STENVAN_BENCH_RESULTS when set, else benchmarks/results."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR)


def device_name(device: str = "cpu") -> str:
    """A human name for the device the figures were measured on."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({len(os.sched_getaffinity(0))} cores)"


def versions() -> dict:
    """Versions of the packages that matter for the figures; absent packages are left out."""
    out = {"python": platform.python_version()}
    for name, module in (("torch", "torch"), ("torchvision", "torchvision"), ("dali", "nvidia.dali"),
                         ("numpy", "numpy"), ("pillow", "PIL")):
        try:
            mod = __import__(module, fromlist=["__version__"])
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional package is simply not reported
            continue
    try:
        import torch

        if torch.version.cuda:
            out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return out


def summarize(samples_s: list[float]) -> dict:
    """Median and spread of repeated timings (seconds)."""
    return {
        "median_s": statistics.median(samples_s),
        "min_s": min(samples_s),
        "max_s": max(samples_s),
        "repeats": len(samples_s),
    }


class Timer:
    """Wall-clock timer; call `sync` (e.g. torch.cuda.synchronize) before each timestamp on a GPU."""

    def __init__(self, sync=None):
        self.sync = sync or (lambda: None)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.elapsed_s = time.perf_counter() - self.start


def append_results(benchmark: str, rows: list[dict]) -> Path:
    """Append one JSON object per measured variant to <results_dir()>/<benchmark>.jsonl."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{benchmark}.jsonl"
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({"benchmark": benchmark, "time": stamp, **row}) + "\n")
    return path


def print_table(columns: list[str], rows: list[list], title: str | None = None) -> None:
    """Print rows as an aligned plain-text table."""
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    if title:
        print(title)
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)

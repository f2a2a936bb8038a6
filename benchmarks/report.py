"""Rewrite benchmarks/RESULTS.md from benchmarks/results/*.jsonl: the newest figures per benchmark, device and
variant, with the versions they were measured with. `make bench` runs every benchmark, then this.

    python -m benchmarks.report
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import RESULTS_DIR

OUT = Path(__file__).resolve().parent / "RESULTS.md"
# Columns worth showing per benchmark (the JSON lines keep everything).
COLUMNS = {
    "prepare": ["workers", "shard_bytes", "frames", "frames_per_s", "mb_per_s", "ratio_to_stream", "ratio_to_copy"],
    "non_local": ["shape", "attention", "batch", "dtype", "median_s", "peak_mem_mib", "sdpa_backend",
                  "speedup_vs_reference", "memory_ratio_vs_reference"],
    "loader": ["size", "batch", "workers", "clips_per_s", "frames_per_s", "vs_original", "data_wait_share"],
    "train_step": ["arch", "batch", "clips_per_s", "frames_per_s", "peak_mem_bytes", "achieved_tflops",
                   "ratio_to_original", "ckpt_every", "ckpt_mb", "ckpt_wait_share"],
    "eval": ["arch", "batch", "frames_per_s", "projected_mars_dense_s"],
    "synthetic": ["layout", "workers", "frames", "frames_per_s", "frames_per_s_per_worker", "frames_per_cpu_s",
                  "bytes_per_frame", "load_avg_1m_max", "projected_full_s"],
    "rerank": ["nodes", "seconds", "peak_mem_mib", "plain_map", "rerank_map"],
    "search": ["gallery", "queries", "seconds", "queries_per_s", "features_mib", "peak_extra_mib"],
}
HEADER = """# Benchmark results

Written by `python -m benchmarks.report` (run by `make bench`) from `benchmarks/results/*.jsonl`: for each
benchmark, device and variant, the newest measurement. Every figure was measured by the command named in its
section on the device named in its table; nothing here is extrapolated. Ratios compare variants measured in
the same run.
"""


def _key(row: dict) -> tuple:
    ident = [row.get("device"), row.get("variant")]
    for extra in ("arch", "shape", "size", "workers", "shard_bytes", "batch"):
        if extra in row:
            ident.append(row[extra])
    return tuple(str(i) for i in ident)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def main() -> None:
    sections = [HEADER]
    for path in sorted(RESULTS_DIR.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        newest: dict[tuple, dict] = {}
        for row in rows:
            newest[_key(row)] = row  # later lines are newer
        bench = path.stem
        columns = [c for c in COLUMNS.get(bench, []) if any(c in r for r in newest.values())]
        sections.append(f"## `{bench}` (`python -m benchmarks.{bench}`)\n")
        sections.append("| device | variant | " + " | ".join(columns) + " | measured | versions |")
        sections.append("|" + "---|" * (len(columns) + 4))
        for row in sorted(newest.values(), key=lambda r: (str(r.get("device")), r.get("time", ""))):
            versions = ", ".join(f"{k} {v}" for k, v in row.get("versions", {}).items())
            cells = [_fmt(row.get(c)) for c in columns]
            sections.append(f"| {row.get('device')} | {row.get('variant')} | " + " | ".join(cells)
                            + f" | {row.get('time', '')} | {versions} |")
        sections.append("")
    OUT.write_text("\n".join(sections) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

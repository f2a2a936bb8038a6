"""Rewrite benchmarks/RESULTS.md from benchmarks/results/*.jsonl: the newest figures per benchmark, device and
variant, with the versions they were measured with. `make bench` runs every benchmark, then this.

    python -m benchmarks.report
    python -m benchmarks.report --add gpu-out/results.jsonl   # file a run's lines (e.g. from a GPU machine) first

--add appends each line of the file to benchmarks/results/<its "benchmark">.jsonl (lines already there are not
added twice), then rewrites RESULTS.md. With STENVAN_BENCH_RESULTS=DIR (or --results-dir DIR) the results are read
from DIR and the report goes to DIR/RESULTS.md, never over the committed one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS_DIR, results_dir

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
    "gpu_check": ["mode", "status", "seconds", "detail"],
    "gpu_targets": ["mode", "figure", "verdict"],
    "mars_run": ["train_frames", "test_frames", "seconds", "frames_per_s", "data_wait_share", "ckpt_wait_share",
                 "exit_code", "projected_mars_dense_s", "standard_rank1", "standard_map"],
}
# Benchmarks whose lines another command writes (the rest: `python -m benchmarks.<name>`).
COMMANDS = {"gpu_check": "make gpu-check", "gpu_targets": "make gpu-check", "mars_run": "make gpu-check"}
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


def add_lines(source: Path, folder: Path) -> int:
    """Append the JSON lines of `source` to folder/<benchmark>.jsonl, skipping lines already there."""
    added = 0
    known: dict[Path, set[str]] = {}  # each target file's lines (canonical JSON), read once
    for line in source.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "benchmark" not in row:
            raise SystemExit(f"report: error: {source}: a line without a 'benchmark' key: {line[:80]}")
        path = folder / f"{row['benchmark']}.jsonl"
        if path not in known:
            known[path] = {json.dumps(json.loads(k), sort_keys=True) for k in path.read_text().splitlines()
                           if k.strip()} if path.exists() else set()
        canonical = json.dumps(row, sort_keys=True)
        if canonical in known[path]:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        known[path].add(canonical)
        added += 1
    return added


def write_report(folder: Path, out: Path) -> Path:
    sections = [HEADER]
    for path in sorted(folder.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        newest: dict[tuple, dict] = {}
        for row in rows:
            newest[_key(row)] = row  # later lines are newer
        bench = path.stem
        columns = [c for c in COLUMNS.get(bench, []) if any(c in r for r in newest.values())]
        sections.append(f"## `{bench}` (`{COMMANDS.get(bench, f'python -m benchmarks.{bench}')}`)\n")
        sections.append("| device | variant | " + " | ".join(columns) + " | measured | versions |")
        sections.append("|" + "---|" * (len(columns) + 4))
        for row in sorted(newest.values(), key=lambda r: (str(r.get("device")), r.get("time", ""))):
            versions = ", ".join(f"{k} {v}" for k, v in row.get("versions", {}).items())
            cells = [_fmt(row.get(c)) for c in columns]
            sections.append(f"| {row.get('device')} | {row.get('variant')} | " + " | ".join(cells)
                            + f" | {row.get('time', '')} | {versions} |")
        sections.append("")
    out.write_text("\n".join(sections) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", type=Path, help="results folder (default: $STENVAN_BENCH_RESULTS or "
                                                         "benchmarks/results)")
    parser.add_argument("--out", type=Path, help="report file (default: benchmarks/RESULTS.md for the committed "
                                                 "results, RESULTS.md inside any other results folder)")
    parser.add_argument("--add", type=Path, action="append", default=[],
                        help="a JSONL file of results to file into the results folder first (repeatable)")
    args = parser.parse_args(argv)
    folder = args.results_dir or results_dir()
    out = args.out or (OUT if folder.resolve() == RESULTS_DIR.resolve() else folder / "RESULTS.md")
    for source in args.add:
        if not source.is_file():
            parser.error(f"--add {source}: no such file")
        print(f"added {add_lines(source, folder)} new line(s) from {source} to {folder}")
    print(f"wrote {write_report(folder, out)}")


if __name__ == "__main__":
    main()

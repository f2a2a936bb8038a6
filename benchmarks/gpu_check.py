"""`make gpu-check`: one unattended command that proves the GPU path at real scale and brings every figure back.

    python -m benchmarks.gpu_check [--out DIR] [--minutes 6] [--smoke | --gpu] [--work DIR] [--keep-work]
    make gpu-check GPU_CHECK_ARGS="--out $OUT"          # on the lent GPU machine, see benchmarks/README.md

It starts with a preflight (a second): a package the stages need that is not installed stops it at once, in one
line naming the package (exit code 2), rather than minutes into a lent GPU's time. On a machine with CUDA (GPU
mode) it runs, within a budget of --minutes shared by all stages, each stage a
subprocess with a timeout: the `gpu`-marked tests, every benchmark at the paper's sizes, and a MARS-scale run
(a synthetic dataset with MARS's real train sizes, generated and prepared in the background while the tests and
the model benchmarks use the GPU; the STE-NVAN preset trained for a fixed time and stopped with SIGTERM; then
eval.py). Without CUDA (or with --smoke) the same stages run at tiny sizes on the CPU, skipping those that need
a GPU or take minutes there, and saying why. Stages are listed in benchmarks/gpu_check_stages.py.

A failed stage is reported and the next one runs; the exit code is 1 if any stage failed, else 0. Outputs
(at most 8 files, none over 16 MiB, written after every stage so that a run stopped from outside still leaves
them): under --out summary.md (stages, figures, targets; also printed last), summary.json, gpu_check.log (every
stage's output), results.jsonl (this run's benchmark lines), RESULTS.md, mars_train_metrics.jsonl and
mars_eval_metrics.json. In GPU mode the lines are also filed into benchmarks/results/ and
benchmarks/RESULTS.md is rewritten (not with --no-repo-results); in smoke mode the committed results are never
touched (STENVAN_BENCH_RESULTS points the benchmarks at the work folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

from benchmarks.common import RESULTS_DIR, RESULTS_ENV, device_name, versions
from benchmarks.gpu_check_run import LOG_KEEP_BYTES, REPO, Background, Context, Outcome, stop_group

SMOKE_CAP = 0.4  # the least share of the budget a smoke stage may take
OUTPUTS = ("summary.md", "summary.json", "gpu_check.log", "results.jsonl", "RESULTS.md", "mars_train_metrics.jsonl",
           "mars_eval_metrics.json")  # everything written under --out (at most 8 files)

# Import name -> what to install. Every stage needs these; looked for, not imported (the preflight takes a second).
REQUIRED = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "Pillow", "scipy": "scipy",
            "yaml": "PyYAML", "tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest",
            "nvidia.dali": "nvidia-dali-cuda130 (nvidia-dali-cuda120 with a CUDA 12 torch)"}
OPTIONAL = {"triton": "triton (the compile stages and the compile tests)",
            "xdist": "pytest-xdist (the tests stage runs its files one after the other without it)",
            "tensorboard": "tensorboard (the MARS-scale run writes no TensorBoard scalars without it)"}


def preflight() -> tuple[list[str], list[str]]:
    """(the required packages that are not installed, the optional ones with what is lost without them)."""
    def missing(names: dict) -> list[str]:
        found = []
        for module, package in names.items():
            try:
                spec = find_spec(module)
            except (ImportError, ValueError):  # a missing parent package (nvidia)
                spec = None
            if spec is None:
                found.append(package)
        return found
    return missing(REQUIRED), missing(OPTIONAL)


def gpu_description() -> str:
    """The GPU's name, memory and driver from nvidia-smi (the parent process never starts CUDA itself)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out.splitlines()[0] if out else "unknown GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown GPU (no nvidia-smi)"


def environment(ctx: Context) -> dict:
    info = {"mode": ctx.mode, "device": gpu_description() if ctx.gpu else device_name("cpu"), "cpus": ctx.cpus,
            "versions": versions(), "budget_min": ctx.budget_s / 60, "load_avg_start": os.getloadavg()[0]}
    for name, module in (("triton", "triton"), ("webdataset", "webdataset")):
        try:
            info["versions"][name] = getattr(__import__(module), "__version__", "?")
        except Exception:  # noqa: BLE001 - reported as missing
            info["versions"][name] = "missing"
    if "dali" not in info["versions"]:
        info["versions"]["dali"] = "missing (stage the wheels: benchmarks/README.md)"
    return info


def collect_logs(ctx: Context, stages) -> str:
    parts = []
    for stage in stages:
        path = ctx.log(stage.name)
        if not path.exists():
            continue
        data = path.read_bytes()
        if len(data) > LOG_KEEP_BYTES:
            head, tail = data[:LOG_KEEP_BYTES // 5], data[-(LOG_KEEP_BYTES - LOG_KEEP_BYTES // 5):]
            data = head + f"\n[... {len(data) - LOG_KEEP_BYTES:,} bytes left out ...]\n".encode() + tail
        parts.append(f"===== {stage.name} =====\n" + data.decode(errors="replace"))
    return "\n".join(parts)


def write_outputs(ctx: Context, stages, outcomes: dict, info: dict, final: bool) -> str:
    """Everything under --out (rewritten after each stage); returns the summary text."""
    from benchmarks.gpu_check_stages import summary_text, targets

    target_rows = targets(ctx)
    text = summary_text(ctx, stages, outcomes, info, target_rows, final)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "summary.md").write_text(text)
    summary = {**info, "stages": {s.name: vars(outcomes[s.name]) if s.name in outcomes else None for s in stages},
               "figures": ctx.figures, "targets": target_rows, "finished": final}
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (ctx.out / "gpu_check.log").write_text(collect_logs(ctx, stages))
    lines = [line for path in sorted(ctx.results.glob("*.jsonl")) for line in path.read_text().splitlines()
             if line.strip()]
    (ctx.out / "results.jsonl").write_text("".join(line + "\n" for line in lines))
    for name, source in (("mars_train_metrics.jsonl", ctx.work / "mars_run" / "metrics.jsonl"),
                         ("mars_eval_metrics.json", ctx.work / "mars_run" / "eval" / "metrics.json")):
        if source.exists():
            shutil.copyfile(source, ctx.out / name)
    return text


def report(ctx: Context, repo_results: bool) -> str:
    """RESULTS.md: in GPU mode this run's lines filed into benchmarks/results/ and the committed report
    rewritten (unless --no-repo-results); otherwise a report of this run alone."""
    from benchmarks.report import OUT, add_lines, write_report

    if repo_results:
        added = add_lines(ctx.out / "results.jsonl", RESULTS_DIR)
        shutil.copyfile(write_report(RESULTS_DIR, OUT), ctx.out / "RESULTS.md")
        return f"{added} result line(s) filed into {RESULTS_DIR}; {OUT} rewritten (copy in {ctx.out / 'RESULTS.md'})"
    write_report(ctx.results, ctx.out / "RESULTS.md")
    return f"report of this run alone: {ctx.out / 'RESULTS.md'} (benchmarks/results/ untouched)"


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check", help="results folder (8 files)")
    parser.add_argument("--minutes", type=float, default=6.0, help="time budget shared by all stages (default 6)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny CPU sizes even if CUDA is present")
    mode.add_argument("--gpu", action="store_true", help="GPU mode; an error without CUDA")
    parser.add_argument("--work", type=Path, help="scratch folder for data, shards and runs (default: a new "
                                                  "temporary folder, removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    parser.add_argument("--test-scale", type=float, help="MARS test split size as a fraction of the real one "
                                                         "(default 0.1 on a GPU, 0.002 in smoke mode)")
    parser.add_argument("--train-minutes", type=float,
                        help="MARS-scale training time before SIGTERM (default 1 on a GPU, 0.1 in smoke mode; "
                             "less if the budget is short)")
    parser.add_argument("--no-repo-results", action="store_true",
                        help="GPU mode: do not file the lines into benchmarks/results/ nor rewrite RESULTS.md")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    required, optional = preflight()
    if required:
        print(f"gpu-check: missing package(s): {', '.join(required)}; install them (benchmarks/README.md: the GPU "
              "machine) and rerun", file=sys.stderr, flush=True)
        return 2
    if optional:
        print(f"gpu-check: note: not installed: {'; '.join(optional)}", flush=True)

    import torch

    has_cuda = torch.cuda.is_available()
    if args.gpu and not has_cuda:
        parser.error("--gpu: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    gpu = has_cuda and not args.smoke
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-", dir=os.environ.get("TMPDIR", "/tmp")))
    for sub in ("logs", "tmp", "results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    ctx = Context(mode="gpu" if gpu else "smoke", budget_s=60 * args.minutes, work=work, out=args.out.resolve(),
                  python=sys.executable, cpus=len(os.sched_getaffinity(0)),
                  test_scale=args.test_scale or (0.1 if gpu else 0.002),
                  train_minutes=args.train_minutes or (1.0 if gpu else 0.1))
    ctx.results = work / "results"
    ctx.out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # an earlier run's files must not pass for this run's
        (ctx.out / name).unlink(missing_ok=True)
    os.environ[RESULTS_ENV] = str(ctx.results)  # this process's own lines (gpu_check, mars_run) go there too

    from benchmarks.gpu_check_stages import BACKGROUND, STAGES, record_stages

    info = environment(ctx)
    ctx.figures["device"] = info["device"].split(",")[0]  # the name alone, as the benchmarks write it
    why_smoke = "" if gpu else (" (forced by --smoke)" if has_cuda else " (no CUDA here)")
    print(f"gpu-check: {ctx.mode} mode{why_smoke}, {info['device']}, {ctx.cpus} CPUs, budget {args.minutes:g} min, "
          f"load {info['load_avg_start']:.2f}; scratch {work}", flush=True)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), flush=True)
    stages = [*BACKGROUND, *STAGES]
    outcomes: dict[str, Outcome] = {}
    old_handler = signal.signal(signal.SIGTERM, _interrupted)  # stopped from outside: stop our subprocesses too
    try:
        for stage in BACKGROUND:  # CPU-bound work started now, beside the GPU stages below
            ctx.background[stage.name] = Background(ctx, stage, stage.cap * ctx.budget_s)
        for stage in STAGES:
            reserve = sum(s.least_s for s in STAGES[STAGES.index(stage) + 1:] if not s.optional)
            # Smoke stages are tiny but a loaded 2-core machine can slow them several times: their caps are loose
            # (the budget still bounds the whole run).
            cap = stage.cap if ctx.gpu else max(stage.cap, SMOKE_CAP)
            # Earlier stages come first: one gets at least least_s while that much is left, even if later ones
            # then have to be skipped.
            timeout = min(cap * ctx.budget_s, max(ctx.remaining() - (0 if stage.optional else reserve), stage.least_s),
                          ctx.remaining())
            started = time.monotonic()
            ctx.figures.setdefault("stage_start_s", {})[stage.name] = started - ctx.start
            if timeout < stage.least_s:
                outcome = Outcome("skipped", f"budget: {max(timeout, 0):.0f} s left for it, it needs "
                                             f"{stage.least_s:.0f} s (a larger --minutes runs it)")
            else:
                try:
                    outcome = stage.run(ctx, timeout)
                except Exception as e:  # noqa: BLE001 - a broken stage is reported, the next one runs
                    outcome = Outcome("fail", f"{type(e).__name__}: {e}")
            outcome.seconds = outcome.seconds or time.monotonic() - started
            if stage.optional and outcome.status == "fail" and outcome.detail.startswith("stopped at its time limit"):
                outcome = Outcome("skipped", f"out of budget: stopped after {outcome.seconds:.0f} s, the time the "
                                             "other stages left (a larger --minutes runs it)", outcome.seconds)
            outcomes[stage.name] = outcome
            print(f"[{time.monotonic() - ctx.start:6.0f} s] {stage.name}: {outcome.status} "
                  f"({outcome.seconds:.0f} s) {outcome.detail}", flush=True)
            for name, job in ctx.background.items():
                if job.outcome is not None and name not in outcomes:
                    outcomes[name] = job.outcome
                    print(f"[{time.monotonic() - ctx.start:6.0f} s] {name} (background): {job.outcome.status} "
                          f"({job.outcome.seconds:.0f} s) {job.outcome.detail}", flush=True)
            write_outputs(ctx, stages, outcomes, info, final=False)
        for name, job in ctx.background.items():
            outcomes[name] = job.wait(max(ctx.remaining(), 0) + 30) or \
                Outcome("fail", "still running at the end of the budget")
        info["load_avg_end"] = os.getloadavg()[0]
        info["wall_s"] = time.monotonic() - ctx.start
        record_stages(ctx, stages, outcomes)
        text = write_outputs(ctx, stages, outcomes, info, final=True)  # report() files its results.jsonl
        print(report(ctx, repo_results=gpu and not args.no_repo_results), flush=True)
        keep = args.keep_work or args.work
        print(f"files in {ctx.out}: {', '.join(sorted(p.name for p in ctx.out.iterdir()))}; scratch {work} "
              + ("kept" if keep else "removed next (a MARS-scale tree takes a while: --keep-work skips that)"))
        print("\n" + text, flush=True)  # last: the device tool returns only the end of the output
        count = {status: sum(o.status == status for o in outcomes.values()) for status in ("pass", "fail", "skipped")}
        print(f"gpu-check: {count['pass']} passed, {count['fail']} failed, {count['skipped']} skipped", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        for proc in list(ctx.procs):  # only on an interruption: every stage waits for its own processes
            stop_group(proc, grace_s=5)
        if not (args.keep_work or args.work):
            shutil.rmtree(work, ignore_errors=True)
    return 1 if count["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""The stages of `make gpu-check` (benchmarks/gpu_check.py), their sizes per mode, the figures they bring back
and the targets those figures are compared with.

Each stage runs the project's own commands (pytest, `python -m benchmarks.X`, `prepare`, train.py, eval.py) in
subprocesses. GPU mode uses the paper's sizes (32 clips x 8 frames x 256x128) and a dataset with MARS's real
train split; smoke mode uses tiny sizes, so that the whole check runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

from benchmarks.common import append_results, device_name, versions
from benchmarks.gpu_check_mars import mars_eval, mars_train
from benchmarks.gpu_check_run import Context, Outcome, data_paths, failed, py, run_process, workers

# Paper-size model arguments of the benchmarks; the smoke sizes keep every code path (STE-NVAN needs clip_len
# a multiple of 4 and stripes dividing height/16).
SMOKE_MODEL = ["--clip-len", "4", "--height", "32", "--width", "16"]


@dataclass
class Stage:
    name: str
    what: str  # what it checks or measures in GPU mode
    cap: float  # at most this fraction of the budget
    least_s: float  # skipped when less than this is left for it
    run: Callable[[Context, float], Outcome]
    optional: bool = False  # no time is reserved for it: it runs on what the other stages left


# ----------------------------------------------------------------------------------------------------------
# The dataset (background, CPU) and the stages that need it
# ----------------------------------------------------------------------------------------------------------

def build_dataset(ctx: Context, timeout: float) -> Outcome:
    data, shards = data_paths(ctx)
    n = ctx.cpus  # all cores; the tests and compile_ahead run meanwhile (the summary says which stages overlapped)
    sizes = ["--real-sizes", "--test-scale", ctx.test_scale]
    if not ctx.gpu:  # tiny: 1 % of MARS's train split, 200 test frames, tracklets of at most 120 frames
        sizes += ["--scale", "0.01", "--max-len", "120", "--test-frames", "200"]
    end = time.monotonic() + timeout
    code, gen_s = run_process(ctx, "dataset", py(ctx, "-m", "prepare", "synthetic", "--layout", "mars", "--out", data,
                                                 *sizes, "--workers", n), timeout)
    if code != 0:
        return failed(code, ctx, "dataset")
    counts = json.loads((data / "synthetic.json").read_text())
    frames, train = counts["counts"]["frames"], counts["options"]["sizes"]["train_frames"]
    code, prep_s = run_process(ctx, "dataset", py(ctx, "-m", "prepare", "mars", "--data-dir", data, "--out", shards,
                                                  "--workers", n), end - time.monotonic())
    if code != 0:
        return failed(code, ctx, "dataset")
    common = {"device": device_name("cpu"), "versions": versions(), "workers": n, "frames": frames,
              "load_avg_1m": os.getloadavg()[0], "note": "gpu-check, beside the GPU stages"}
    append_results("synthetic", [{**common, "variant": f"gpu-check mars train x{1 if ctx.gpu else 0.01:g} test "
                                  f"x{ctx.test_scale:g}", "layout": "mars", "median_s": gen_s, "frames_per_s":
                                  frames / gen_s, "frames_per_s_per_worker": frames / gen_s / n}])
    append_results("prepare", [{**common, "variant": "gpu-check prepare", "median_s": prep_s,
                                "frames_per_s": frames / prep_s}])
    ctx.figures["dataset"] = {"frames": frames, "train_frames": train, "test_frames": frames - train,
                              "generate_s": gen_s, "prepare_s": prep_s, "workers": n,
                              "sizes": counts["options"]["sizes"]}
    return Outcome("pass", f"{frames:,} frames ({train:,} train) generated in {gen_s:.0f} s "
                           f"({frames / gen_s:,.0f}/s, {n} workers), prepared in {prep_s:.0f} s")


def with_dataset(run: Callable[[Context, float], Outcome]) -> Callable[[Context, float], Outcome]:
    """A stage that needs the shards waits for the background build, within its own time."""
    def wrapped(ctx: Context, timeout: float) -> Outcome:
        start = time.monotonic()
        outcome = ctx.background["dataset"].wait(timeout - 5)
        if outcome is None:
            return Outcome("fail", "the dataset was not ready within this stage's time")
        if outcome.status != "pass":
            return Outcome("skipped", "needs the dataset, which failed")
        return run(ctx, timeout - (time.monotonic() - start))
    return wrapped


def compile_ahead(ctx: Context, timeout: float) -> Outcome:
    """Compile the `ours+compile` train steps once, beside the tests (compiling is CPU work), so that the timed
    compile stages later find torch.compile's caches (Inductor's FX graph and AOTAutograd caches, Triton's
    kernels, on disk) warm and take seconds instead of minutes. Nothing is measured here."""
    if not ctx.gpu:
        return Outcome("skipped", "CPU smoke: no compile stages")
    end = time.monotonic() + timeout
    for arch in ("nvan", "ste_nvan"):
        code, _ = run_process(ctx, "compile_ahead", py(ctx, "-m", "benchmarks.train_step", "--arch", arch, "--device",
                                                       "cuda", "--batch", "32", "--variants", "ours+compile",
                                                       "--warmup", "1", "--repeats", "1", "--no-checkpoint",
                                                       "--no-save"), end - time.monotonic(),
                                  # a few compile threads: the tests and the dataset build share the CPU meanwhile
                                  # (the thread count is not part of Inductor's cache key)
                                  env={"TORCHINDUCTOR_COMPILE_THREADS": "4"})
        if code != 0:
            return failed(code, ctx, "compile_ahead")
    return Outcome("pass", "nvan and ste_nvan train steps compiled (caches warm for the compile stages)")


# ----------------------------------------------------------------------------------------------------------
# The gpu-marked tests
# ----------------------------------------------------------------------------------------------------------

def run_tests(ctx: Context, timeout: float) -> Outcome:
    argv = py(ctx, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "tests")
    if ctx.gpu:
        import importlib.util

        if importlib.util.find_spec("xdist"):  # the GPU image has pytest-xdist: the compile test runs beside the rest
            argv += ["-n", "4", "--dist", "loadfile"]
    code, _ = run_process(ctx, "tests", argv, timeout)
    text = ctx.log("tests").read_text(errors="replace")
    counts = pytest_counts(text) if code is not None else {}
    ctx.figures["tests"] = counts
    failures = [line[7:].split(" - ")[0] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    if code == 0 and not ctx.gpu and counts.get("skipped") and not counts.get("passed"):
        return Outcome("skipped", f"no CUDA: {counts['skipped']} gpu tests collected cleanly, all skipped")
    if code == 0 and counts.get("passed"):
        return Outcome("pass", summary)
    return Outcome("fail", (summary or failed(code, ctx, "tests").detail) +
                   (f"; failing: {', '.join(failures[:6])}" if failures else ""))


def pytest_counts(text: str) -> dict[str, int]:
    """{"passed": 3, "skipped": 1, ...} from pytest's summary line ("3 passed, 1 skipped in 2.10s"), the last line
    of `text` that is one; {} when there is none (pytest crashed, or printed less than usual)."""
    for line in reversed(text.splitlines()):
        if re.search(r"\bin [0-9.]+s\b", line):
            found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
            if found:
                return {k: int(n) for n, k in found}
    return {}


# ----------------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------------

def benchmark(name: str, module: str, gpu_args: Callable[[Context], list], smoke_args: Callable[[Context], list],
              describe: Callable[[Context], str]) -> Callable[[Context, float], Outcome]:
    def run(ctx: Context, timeout: float) -> Outcome:
        args = gpu_args(ctx) if ctx.gpu else smoke_args(ctx)
        code, _ = run_process(ctx, name, py(ctx, "-m", f"benchmarks.{module}", *args), timeout)
        if code != 0:
            return failed(code, ctx, name)
        return Outcome("pass", describe(ctx))
    return run


def _last(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def describe_non_local(ctx: Context) -> str:
    parts = []
    for shape in ("layer2", "layer3"):
        r = _last(ctx.rows("non_local"), variant=f"{shape}/fused")
        if r:
            parts.append(f"{shape}: fused {r['speedup_vs_reference']:.2f}x faster, "
                         f"{r['memory_ratio_vs_reference']:.2f}x less memory, kernel {r['sdpa_backend']}")
            ctx.figures.setdefault("non_local", {})[shape] = r
    return "; ".join(parts)


def describe_train_step(arch: str, compiled: bool) -> Callable[[Context], str]:
    def describe(ctx: Context) -> str:
        parts = []
        for variant in ("original", "ours", *(("ours+compile",) if compiled else ())):
            r = _last(ctx.rows("train_step"), arch=arch, variant=variant)
            if r:
                mem = "n/a" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 1e9:.1f} GB"
                parts.append(f"{variant} {r['clips_per_s']:.1f} clips/s ({r['ratio_to_original'] or 0:.2f}x), "
                             f"peak {mem}, {r['achieved_tflops']:.1f} TFLOP/s")
        for variant in () if compiled else ("ours+sync_bn", "ours+sync_bn_plain"):  # the cost of synchronised BN
            r = _last(ctx.rows("train_step"), arch=arch, variant=variant)
            if r and r.get("ratio_to_ours"):
                parts.append(f"{variant} {r['clips_per_s']:.1f} clips/s ({100 * (1 / r['ratio_to_ours'] - 1):+.1f}% "
                             "step time vs ours, one rank)")
        ckpt = _last(ctx.rows("train_step"), variant="checkpoints in the background")
        if ckpt and arch == "ste_nvan" and not compiled:
            parts.append(f"ckpt wait {100 * ckpt['ckpt_wait_share']:.2f}% in the background")
        return "; ".join(parts)
    return describe


def describe_loader(ctx: Context) -> str:
    rows = ctx.rows("loader")
    return "; ".join(f"{r['variant']} {r['frames_per_s']:,.0f} frames/s" for r in rows[-(5 if ctx.gpu else 3):])


def describe_eval(ctx: Context) -> str:
    return "; ".join(f"{r['variant']} {r['frames_per_s']:,.0f} frames/s -> full MARS dense "
                     f"{r['projected_mars_dense_s'] / 60:.1f} min" for r in ctx.rows("eval"))


def describe_search(ctx: Context) -> str:
    r = _last(ctx.rows("search"))
    return (f"{r['queries']:,} queries x {r['gallery']:,} gallery in {r['seconds']:.2f} s, "
            f"+{r['peak_extra_mib']:,.0f} MiB")


def train_step_args(arch: str, compiled: bool, gpu: bool, ctx: Context) -> list:
    args = ["--arch", arch]
    if gpu:
        args += ["--device", "cuda", "--batch", "32"]
    else:
        args += ["--device", "cpu", "--batch", "2", *SMOKE_MODEL, "--warmup", "0", "--repeats", "1"]
        if arch == "ste_nvan":
            args += ["--stripes", "2"]
    if compiled:  # `ours` was measured by the plain stage; the original again, for the ratio of the same run
        args += ["--variants", "original", "ours+compile"]
    elif arch == "nvan":  # synchronised BatchNorm's cost is measured on STE-NVAN (the same backbone, cheaper)
        args += ["--variants", "original", "ours"]
    if compiled or arch == "nvan":
        args += ["--no-checkpoint"]
    else:  # STE-NVAN also measures how long training waits for checkpoints
        args += ["--ckpt-dir", ctx.work / "tmp"] + ([] if gpu else ["--ckpt-steps", "1", "--ckpt-every", "1"])
    return args


def train_step_stage(arch: str, compiled: bool) -> Callable[[Context, float], Outcome]:
    name = f"{'compile' if compiled else 'train_step'}_{arch}"
    run = benchmark(name, "train_step", lambda ctx: train_step_args(arch, compiled, True, ctx),
                    lambda ctx: train_step_args(arch, compiled, False, ctx), describe_train_step(arch, compiled))
    if not compiled:
        return run

    def after_compile_ahead(ctx: Context, timeout: float) -> Outcome:
        if not ctx.gpu:
            return Outcome("skipped", "CPU smoke: torch.compile of a ResNet-50 training step takes minutes on 2 "
                                      "cores (the trainer's compile path is a gpu test)")
        start = time.monotonic()
        ctx.background["compile_ahead"].wait(timeout / 2)  # warm caches; cold if it failed (then it compiles here)
        return run(ctx, timeout - (time.monotonic() - start))
    return after_compile_ahead


def loader_args(ctx: Context, gpu: bool) -> list:
    data, shards = data_paths(ctx)
    args = ["--data", shards, "--raw", data]
    if gpu:  # also the hardware JPEG decoder's share of the frames at 0 and 1 (DALI's default: 0.65)
        return args + ["--device", "cuda", "--workers", workers(ctx), "--batches", "20", "--repeats", "2",
                       "--hw-decoder-load", "0", "1"]
    return args + ["--device", "cpu", "--workers", "1", "--P", "2", "--K", "2", *SMOKE_MODEL, "--batches", "2",
                   "--repeats", "1"]


def eval_args(ctx: Context, gpu: bool) -> list:
    shards = data_paths(ctx)[1]
    if gpu:
        return ["--arch", "ste_nvan", "--device", "cuda", "--data", shards, "--workers", workers(ctx)]
    return ["--arch", "ste_nvan", "--device", "cpu", "--batch", "8", *SMOKE_MODEL, "--stripes", "2", "--repeats", "1",
            "--data", shards, "--workers", "1"]


BACKGROUND = [  # started at once, beside the stages below
    Stage("dataset", "synthetic MARS-layout set at MARS's real train sizes (test split scaled), generated and "
          "prepared into shards on the CPU while the GPU stages run", 0.5, 0, build_dataset),
    Stage("compile_ahead", "torch.compile of the nvan and ste_nvan train steps beside the tests, so that the timed "
          "compile stages find the caches warm (nothing measured)", 0.5, 0, compile_ahead),
]
STAGES = [
    Stage("tests", "pytest -m gpu: mixed decode = CPU decode, GPU loader = CPU loader, fused vs reference NL in "
          "bf16, steps under sync debug mode (also with synchronised BatchNorm), our SyncBatchNorm over NCCL = "
          "torch's = BatchNorm, DDP + SyncBatchNorm = the plain model, fp16 GradScaler, compile, eval after train; "
          "two ranks on the GPU over gloo: fused SyncBatchNorm = BatchNorm on the whole batch, DDP + SyncBatchNorm + "
          "compile = eager, the triplet all-gather = one process",
          0.35, 30, run_tests),
    Stage("non_local", "one NL block fwd+bwd at batch 32, bf16: fused vs reference time, memory, SDPA kernel", 0.08, 10,
          benchmark("non_local", "non_local", lambda ctx: ["--device", "cuda"],
                    lambda ctx: ["--device", "cpu", "--batch", "1", "--clip-len", "2", "--warmup", "0",
                                 "--repeats", "1"],
                    describe_non_local)),
    Stage("train_step_nvan", "NVAN train step at 32x8x256x128: ours vs the original configuration, peak memory, "
          "TFLOP/s", 0.1, 15, train_step_stage("nvan", False)),
    Stage("train_step_ste_nvan", "STE-NVAN train step at 32x8x256x128 (same), the cost of synchronised BatchNorm "
          "(one rank: fused kernels and plain ops vs ours), checkpoint wait share", 0.12, 20,
          train_step_stage("ste_nvan", False)),
    Stage("loader", "training loader at the paper batch on the MARS-scale shards: DALI mixed vs torch vs original",
          0.1, 10, with_dataset(benchmark("loader", "loader", lambda ctx: loader_args(ctx, True),
                                           lambda ctx: loader_args(ctx, False), describe_loader))),
    Stage("eval_bench", "dense feature extraction frames/s (model alone and end to end) and projected full-MARS time",
          0.1, 10, with_dataset(benchmark("eval_bench", "eval", lambda ctx: eval_args(ctx, True),
                                           lambda ctx: eval_args(ctx, False), describe_eval))),
    Stage("mars_train", "train.py, STE-NVAN paper preset (pretrained none) on the MARS-scale shards for a fixed time, "
          "stopped by SIGTERM: frames/s, data-wait and checkpoint-wait shares, clean exit 0", 0.35, 40,
          with_dataset(mars_train)),
    Stage("mars_eval", "eval.py --mode dense on that run's checkpoint: frames/s, projected full-MARS time", 0.15, 25,
          with_dataset(mars_eval)),
    Stage("search", "top-10 search of 1,000 queries in a 100,000-tracklet gallery on the GPU, chunked", 0.05, 8,
          benchmark("search", "search", lambda ctx: ["--device", "cuda"],
                    lambda ctx: ["--device", "cpu", "--gallery", "2000", "--queries", "50"], describe_search),
          optional=True),
    Stage("compile_nvan", "NVAN train step with torch.compile (ours+compile vs original)", 0.3, 30,
          train_step_stage("nvan", True), optional=True),
    Stage("compile_ste_nvan", "STE-NVAN train step with torch.compile", 0.3, 30, train_step_stage("ste_nvan", True),
          optional=True),
]


# ----------------------------------------------------------------------------------------------------------
# Targets and the summary
# ----------------------------------------------------------------------------------------------------------

def targets(ctx: Context) -> list[dict]:
    """The issue's targets for one H100/H200, beside this run's figures (reported, never asserted)."""
    rows = []

    def add(target: str, figure: str | None, met: bool | None):
        verdict = "not measured" if figure is None else "n/a (CPU smoke)" if not ctx.gpu else \
            ("met" if met else "missed")
        rows.append({"target": target, "figure": figure or "-", "verdict": verdict})

    steps = ctx.rows("train_step")
    ours = list({r["variant"]: r for r in steps  # the newest of each (the compile stage re-measures `ours`)
                 if r.get("arch") == "nvan" and r.get("variant") in ("ours", "ours+compile")}.values())
    best = max(ours, key=lambda r: r["ratio_to_original"] or 0, default=None)
    add("NVAN train step >= 3x the original configuration",
        ", ".join(f"{r['variant']} {r['ratio_to_original'] or 0:.2f}x (batch {r['batch']})" for r in ours) or None,
        best is not None and (best["ratio_to_original"] or 0) >= 3)
    plain = _last(steps, arch="nvan", variant="ours")
    mem = plain and plain["peak_mem_bytes"]
    add("NVAN trainable at 32x8 in < 40 GB", f"{mem / 1e9:.1f} GB at batch {plain['batch']}" if mem else None,
        bool(mem) and mem < 40e9 and plain["batch"] == 32)
    e2e = [r for r in ctx.rows("eval") if r["variant"].startswith("end-to-end")]
    run_eval = _last(ctx.rows("mars_run"), variant="eval.py dense")
    figures = [f"{r['variant']}: {r['projected_mars_dense_s'] / 60:.2f} min" for r in e2e]
    if run_eval:
        figures.append(f"eval.py dense: {run_eval['projected_mars_dense_s'] / 60:.2f} min")
    projected = [r["projected_mars_dense_s"] for r in e2e + ([run_eval] if run_eval else [])]
    add("full dense MARS evaluation < 2 min (projected from the measured frames/s)", "; ".join(figures) or None,
        bool(projected) and max(projected) < 120)
    train = _last(ctx.rows("mars_run"), variant="train ste_nvan preset")
    add("data-wait share < 5 % while training STE-NVAN",
        f"{100 * train['data_wait_share']:.1f} %" if train and train.get("data_wait_share") is not None else None,
        bool(train) and (train.get("data_wait_share") or 1) < 0.05)
    nl = _last(ctx.rows("non_local"), variant="layer2/fused")
    add("fused NL >= 2x faster than the reference at layer2",
        f"{nl['speedup_vs_reference']:.2f}x (batch {nl['batch']}, {nl['dtype']})" if nl else None,
        bool(nl) and nl["speedup_vs_reference"] >= 2)
    add("fused NL >= 4x less memory than the reference at layer2",
        f"{nl['memory_ratio_vs_reference']:.2f}x" if nl else None, bool(nl) and nl["memory_ratio_vs_reference"] >= 4)
    return rows


def record_stages(ctx: Context, stages: list[Stage], outcomes: dict) -> None:
    """One `gpu_check` line per stage (what passed, failed or was skipped where, in how long) and one
    `gpu_targets` line per target, so that RESULTS.md shows both."""
    common = {"device": ctx.figures.get("device") or device_name("cpu"), "versions": versions(), "mode": ctx.mode}
    append_results("gpu_check", [{**common, "variant": s.name, "status": outcomes[s.name].status,
                                  "seconds": outcomes[s.name].seconds, "detail": outcomes[s.name].detail[:300],
                                  "budget_s": ctx.budget_s} for s in stages if s.name in outcomes])
    append_results("gpu_targets", [{**common, "variant": t["target"], "figure": t["figure"], "verdict": t["verdict"]}
                                   for t in targets(ctx)])


def summary_text(ctx: Context, stages: list[Stage], outcomes: dict, info: dict, target_rows: list[dict],
                 final: bool) -> str:
    data = ctx.figures.get("dataset")
    lines = [f"# gpu-check: {ctx.mode} mode on {info['device']} ({ctx.cpus} CPUs)" + ("" if final else " [running]"),
             "",
             f"Budget {ctx.budget_s / 60:g} min, wall {info.get('wall_s', time.monotonic() - ctx.start) / 60:.1f} min, "
             f"load average {info['load_avg_start']:.2f} at start" + (f", {info['load_avg_end']:.2f} at the end"
                                                                     if "load_avg_end" in info else "") + ".",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
             "",
             "| stage | status | s | checks / measures (GPU mode) | result |", "|---|---|---|---|---|"]
    for s in stages:
        o = outcomes.get(s.name)
        status, secs, detail = (o.status.upper() if o.status == "fail" else o.status, f"{o.seconds:.0f}", o.detail) \
            if o else ("not run", "-", "")
        lines.append(f"| {s.name} | {status} | {secs} | {s.what} | {detail.replace('|', '/')} |")
    lines += ["", "Targets (one H100/H200; reported beside the figures, never asserted):", "",
              "| target | figure | verdict |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['figure']} | {t['verdict']} |" for t in target_rows]
    if data:
        z = data["sizes"]
        sizes = (f"train {z['train_ids']:,} ids / {z['train_tracklets']:,} tracklets / {z['train_frames']:,} frames"
                 + (" (MARS's real train split)" if ctx.gpu else " (1 % of MARS's)")
                 + f"; test {z['test_tracklets']:,} tracklets / {z['test_frames']:,} frames (MARS's x "
                 f"{ctx.test_scale:g}" + (")" if ctx.gpu else ", 200 frames)"))
    else:
        sizes = "not built"
    lines += ["", f"MARS-scale dataset: {sizes}. Model weights: `pretrained: none` (the GPU machine has no internet, "
              "so no ImageNet weights): rank-1/mAP of the short run measure nothing but that evaluation works.",
              "Skipped stages say why; a failed stage's output is in gpu_check.log. Exit code: 1 if any stage "
              "failed."]
    for name, end in ctx.figures.get("background_end_s", {}).items():
        if name not in outcomes or outcomes[name].status == "skipped":
            continue
        shared = [stage for stage, t in ctx.figures.get("stage_start_s", {}).items() if t < end]
        lines.append(f"Background stage {name} ended {end:.0f} s after the start; stages that began before then shared "
                     f"the machine with it: {', '.join(shared) or 'none'}.")
    return "\n".join(lines) + "\n"

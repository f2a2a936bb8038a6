"""The machinery of `make gpu-check` (benchmarks/gpu_check.py): the shared context and budget clock, stage
outcomes, subprocesses with timeouts in their own process groups, and the background stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS_ENV

REPO = Path(__file__).resolve().parents[1]
# Per stage in gpu_check.log (its head and tail): 13 stages stay under the 16 MiB a returned file may have.
LOG_KEEP_BYTES = 1_000_000


@dataclass
class Outcome:
    status: str  # pass | fail | skipped
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Context:
    """What the stages share: mode, folders, the clock and the figures they read back."""
    mode: str  # "gpu" or "smoke"
    budget_s: float
    work: Path
    out: Path
    python: str
    cpus: int
    test_scale: float
    train_minutes: float
    start: float = field(default_factory=time.monotonic)
    results: Path = None  # this run's benchmark lines (STENVAN_BENCH_RESULTS)
    background: dict = field(default_factory=dict)  # name -> Background (stages running beside the others)
    procs: set = field(default_factory=set)  # our live subprocesses (each its own process group), stopped at exit
    figures: dict = field(default_factory=dict)  # stage -> {name: value} for the summary and the targets

    @property
    def gpu(self) -> bool:
        return self.mode == "gpu"

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def log(self, stage: str) -> Path:
        return self.work / "logs" / f"{stage}.log"

    def env(self) -> dict:
        env = dict(os.environ)
        # Our code first (no `make install` on the GPU image), then whatever PYTHONPATH holds (/tmp/site: DALI).
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p])
        env.update({RESULTS_ENV: str(self.results), "BENCH_TMP": str(self.work / "tmp"), "PYTHONUNBUFFERED": "1"})
        return env

    def rows(self, benchmark: str) -> list[dict]:
        path = self.results / f"{benchmark}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_process(ctx: Context, stage: str, argv: list, timeout_s: float, env: dict | None = None,
                stop_when=None, note: str = "") -> tuple[int | None, float]:
    """Run argv in its own process group with output appended to the stage's log (`env`: extra variables);
    (exit code or None if it was stopped at `timeout_s`, seconds). `stop_when()`, if given, is asked every 0.5 s
    while the process runs: once it says True, the process gets SIGTERM (e.g. a training run, which then
    checkpoints and exits 0) and the rest of `timeout_s` to exit. `note` goes into the log after the command."""
    argv = list(map(str, argv))
    log_path = ctx.log(stage)
    start = time.monotonic()
    deadline = start + max(timeout_s, 1)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(argv)}   ({note or f'timeout {timeout_s:.0f} s'})\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env={**ctx.env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        ctx.procs.add(proc)
        try:
            while stop_when is not None and proc.poll() is None and time.monotonic() < deadline:
                if stop_when():
                    proc.send_signal(signal.SIGTERM)  # our child; it stops cleanly, then we wait for it below
                    break
                time.sleep(0.5)
            code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            code = None
        # Not in a `finally`: interrupted while waiting, the process stays in ctx.procs for main's cleanup to stop.
        ctx.procs.discard(proc)
        log.write(f"[exit {code if code is not None else 'timeout'} after {time.monotonic() - start:.1f} s]\n")
    return code, time.monotonic() - start


def stop_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM to the process group we started (the trainer checkpoints and exits), SIGKILL after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class Background:
    """A stage running on a thread (the CPU-bound dataset build) while the main thread runs the GPU stages."""

    def __init__(self, ctx: Context, stage, timeout_s: float):
        self.outcome: Outcome | None = None
        self.stage = stage
        self._thread = threading.Thread(target=self._run, args=(ctx, timeout_s), daemon=True)
        self._thread.start()

    def _run(self, ctx, timeout_s):
        start = time.monotonic()
        try:
            outcome = self.stage.run(ctx, timeout_s)
        except Exception as e:  # noqa: BLE001 - a broken stage is reported, the others go on
            outcome = Outcome("fail", f"{type(e).__name__}: {e}")
        outcome.seconds = time.monotonic() - start
        ends = ctx.figures.setdefault("background_end_s", {})
        ends[self.stage.name] = time.monotonic() - ctx.start  # stages timed before this shared the machine with it
        self.outcome = outcome

    def wait(self, timeout_s: float) -> Outcome | None:
        self._thread.join(max(timeout_s, 0))
        return self.outcome




# Helpers of the stage definitions (benchmarks/gpu_check_stages.py, benchmarks/gpu_check_mars.py)

def py(ctx: Context, *args) -> list[str]:
    return [ctx.python, *map(str, args)]


def workers(ctx: Context) -> int:
    """Loader workers for the paper-size stages: half the cores, at most 8 (the rest feed the GPU)."""
    return max(1, min(8, ctx.cpus // 2)) if ctx.gpu else 1


def data_paths(ctx: Context) -> tuple[Path, Path]:
    """(raw MARS-layout tree, its shards) of the MARS-scale dataset."""
    return ctx.work / "mars_data", ctx.work / "mars_shards"


def failed(code: int | None, ctx: Context, stage: str) -> Outcome:
    """A failed command: its exit code and the last lines of its output."""
    tail = [line for line in ctx.log(stage).read_text(errors="replace").splitlines() if line.strip()][-3:]
    what = "stopped at its time limit" if code is None else f"exit code {code}"
    return Outcome("fail", f"{what}: " + " | ".join(line.strip()[:160] for line in tail))

"""The MARS-scale run of `make gpu-check`: train.py with the STE-NVAN paper preset on the MARS-scale shards for a
fixed time, stopped by SIGTERM (the trainer finishes its step, checkpoints and exits 0: the proof that a
preempted run loses nothing at scale), then eval.py in dense mode on its last checkpoint.

Figures come from the run's own logs: metrics.jsonl's `train` records (one per `log_every` steps: frames/s,
data-wait and checkpoint-wait shares of that window) and eval.py's metrics.json (feature frames/s).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from benchmarks.common import append_results, versions
from benchmarks.gpu_check_run import Context, Outcome, data_paths, failed, py, run_process, workers

MARS_TEST_FRAMES = 681_089  # every frame of the real MARS test split (dense evaluation)
SAVE_MARGIN_S = 30  # after SIGTERM: the step in flight, the checkpoint (~400 MB) written and read back, exit
# Smoke sizes: the preset's code path (STE-NVAN, restricted random sampling, P x K, Adam, DALI) at 32x16.
SMOKE_TRAIN = ["--device", "cpu", "--clip_len", "4", "--height", "32", "--width", "16", "--stripes", "2",
               "--ids_per_batch", "2", "--tracklets_per_id", "2", "--workers", "1", "--log_every", "2",
               "--ckpt_minutes", "0.1"]


def train_records(path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r.get("kind") == "train"]


class TrainingClock:
    """When to stop the MARS-scale run: `train_s` after its first log record (training has started: start-up
    does not count), and at the latest SAVE_MARGIN_S before the stage's time is up, so that the trainer has the
    time to finish its step and checkpoint."""

    def __init__(self, metrics: Path, start: float, timeout: float, train_s: float):
        self.metrics, self.train_s = metrics, train_s
        self.stop_at = start + timeout - SAVE_MARGIN_S
        self.first: float | None = None  # when the first log record appeared
        self.fired_at: float | None = None  # when it said stop (SIGTERM)

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.first is None and train_records(self.metrics):
            self.first = now
            self.stop_at = min(self.stop_at, now + self.train_s)
        if now >= self.stop_at:
            self.fired_at = now
        return self.fired

    def trained_s(self) -> float | None:
        """Seconds from the first log record to SIGTERM (or to now, if the run ended by itself)."""
        return (self.fired_at or time.monotonic()) - self.first if self.first is not None else None


def mars_train(ctx: Context, timeout: float) -> Outcome:
    data, shards = data_paths(ctx)
    run_dir = ctx.work / "mars_run"
    argv = py(ctx, "train.py", "--config", "configs/ste_nvan_mars.yaml", "--data", shards, "--out", run_dir,
              "--pretrained", "none")
    # GPU: the preset as it is (bf16, DALI mixed, P=8 x K=4, 8-frame 256x128 clips), a checkpoint every 15 s so
    # that the checkpoint-wait share is measured while training.
    argv += ["--workers", workers(ctx), "--ckpt_minutes", "0.25"] if ctx.gpu else SMOKE_TRAIN
    # Training time: --train-minutes from the first log record, or less (see TrainingClock).
    train_s = 60 * ctx.train_minutes
    clock = TrainingClock(run_dir / "metrics.jsonl", time.monotonic(), timeout, train_s)
    code, wall_s = run_process(ctx, "mars_train", argv, timeout, stop_when=clock,
                               note=f"SIGTERM after {train_s:.0f} s of training")
    signalled, trained_s = clock.fired, clock.trained_s()
    text = ctx.log("mars_train").read_text(errors="replace")
    records = train_records(run_dir / "metrics.jsonl")
    if code != 0:
        return failed(code, ctx, "mars_train")
    if not (run_dir / "last.pt").exists() or (signalled and "stopped cleanly" not in text):
        return Outcome("fail", "exit 0 but no last.pt / no 'stopped cleanly' line after SIGTERM")
    steady = records[1:] or records  # the first window holds the start-up (autotuning, workers filling)
    if not steady:
        return Outcome("fail", f"no training log record in {wall_s:.0f} s (start-up too slow for the budget?)")
    fps = statistics.median(r["frames_per_s"] for r in steady)
    data_wait = statistics.mean(r["data_wait_share"] for r in steady)
    ckpt_wait = statistics.mean(r["ckpt_wait_share"] for r in steady)
    ckpt_line = next((line for line in reversed(text.splitlines()) if line.startswith("checkpoints:")), "")
    dataset = ctx.figures.get("dataset", {})
    row = {"variant": "train ste_nvan preset", "arch": "ste_nvan", "device": ctx.figures.get("device"),
           "versions": versions(), "train_frames": dataset.get("train_frames"), "test_frames": dataset.get("test_frames"),
           "seconds": wall_s, "train_s": trained_s, "steps": records[-1]["step"],
           "frames_per_s": fps, "data_wait_share": data_wait, "ckpt_wait_share": ckpt_wait,
           "windows": len(steady), "first_window_frames_per_s": records[0]["frames_per_s"],
           "gpu_mem_gib": max((r.get("gpu_mem_gib", 0) for r in records), default=None), "exit_code": code,
           "stopped_by": "SIGTERM" if signalled else "itself", "checkpoints": ckpt_line}
    append_results("mars_run", [row])
    ctx.figures["mars_train"] = row
    return Outcome("pass", f"{records[-1]['step']} steps, {fps:,.0f} frames/s (median of {len(steady)} windows), data "
                           f"wait {100 * data_wait:.1f}%, ckpt wait {100 * ckpt_wait:.2f}%; SIGTERM -> exit 0 with "
                           f"last.pt ({ckpt_line})")


def mars_eval(ctx: Context, timeout: float) -> Outcome:
    shards = data_paths(ctx)[1]
    run_dir = ctx.work / "mars_run"
    if not (run_dir / "last.pt").exists():
        return Outcome("skipped", "no checkpoint from mars_train")
    argv = py(ctx, "eval.py", "--checkpoint", run_dir / "last.pt", "--data", shards, "--mode", "dense", "--out",
              run_dir / "eval")
    argv += ["--batch-size", "64", "--workers", workers(ctx)] if ctx.gpu else \
        ["--batch-size", "8", "--workers", "1", "--device", "cpu"]
    code, wall_s = run_process(ctx, "mars_eval", argv, timeout)
    if code != 0:
        return failed(code, ctx, "mars_eval")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    fps = metrics["feature_frames_per_s"]
    dataset = ctx.figures.get("dataset", {})
    row = {"variant": "eval.py dense", "arch": "ste_nvan", "device": ctx.figures.get("device"), "versions": versions(),
           "test_frames": dataset.get("test_frames"), "seconds": wall_s, "frames_per_s": fps,
           "projected_mars_dense_s": MARS_TEST_FRAMES / fps, "exit_code": code,
           "standard_rank1": metrics["standard"]["rank1"], "standard_map": metrics["standard"]["mAP"]}
    append_results("mars_run", [row])
    ctx.figures["mars_eval"] = row
    return Outcome("pass", f"{fps:,.0f} frames/s dense (feature extraction), eval.py wall {wall_s:.0f} s; full MARS "
                           f"dense projected at {MARS_TEST_FRAMES / fps / 60:.2f} min; standard rank-1 "
                           f"{metrics['standard']['rank1']:.3f}, mAP {metrics['standard']['mAP']:.3f} (from-scratch, "
                           "meaningless)")

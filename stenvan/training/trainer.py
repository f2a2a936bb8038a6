"""The training run: components from the config, a loop that fits on a screen, and nothing ever lost.

One code path for CPU, one GPU and N GPUs on M nodes (torchrun). Checkpoints hold the full state; they are
snapshotted at a step boundary and written in the background (`stenvan.training.checkpoint_writer`) every
`ckpt_minutes` minutes, every `ckpt_every` steps if asked, at the end of the run and on SIGTERM/SIGINT.
A step never waits for the GPU: losses and non-finite counts stay on the device and reach the host (one sync)
every `log_every` steps; a step whose loss or gradients are not finite is skipped on the device. At every step
boundary the ranks agree on the host (`stenvan.training.failures`) whether one of them failed or got a stop signal:
a SIGTERM/SIGINT (to torchrun or to the ranks) stops every rank after its current step, with that step's
checkpoint, and exits 0; a shard changed under the run or a failed loader stops every rank at the same step
boundary, with that step's checkpoint. Rank 0 holds the run folder's lock for the whole run
(`stenvan.training.run_folder`); a resume must keep what its checkpoint was trained with
(`stenvan.training.resume_checks`).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stenvan import distributed
from stenvan.amp import AMP_DTYPES, resolve_precision, scaler_state
from stenvan.amp import autocast as amp_autocast
from stenvan.checkpoint import CheckpointError, step_path
from stenvan.config import ConfigError, TrainConfig
from stenvan.evaluation.leakage import training_record
from stenvan.models.from_config import build_model_from_config
from stenvan.models.sync_batchnorm import convert_sync_batchnorm
from stenvan.person_splits import check_split
from stenvan.shards import ShardFormatError, atomic_write, dataset_fingerprint, load_manifest
from stenvan.training.checkpoint_writer import CheckpointWriter
from stenvan.training.failures import Failures, LoaderFailed
from stenvan.training.losses import ReIDLoss
from stenvan.training.optim import RunningStatistics, build_optimizer, nonfinite_gradients, step_unless
from stenvan.training.resume import agree_on_checkpoint
from stenvan.training.resume_checks import check_resumable, restore_training_state
from stenvan.training.rng import rng_state, seed_everything, set_rng_state
from stenvan.training.run_folder import claim_run_folder
from stenvan.training.runlog import RunLog
from stenvan.training.schedule import lr_factor
from stenvan.training.step_meter import StepMeter


class TrainingStopped(Exception):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


@dataclass
class Progress:
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # index of the next batch within the epoch (the sampler position)
    global_step: int = 0  # optimizer steps taken (including skipped non-finite ones)
    nonfinite_total: int = 0  # as of the last sync point (the step meter holds the steps since)
    nonfinite_in_a_row: int = 0
    best_map: float = -1.0  # best test mAP so far (select_on_test only)


def set_bn_eval(module: torch.nn.Module) -> None:
    """freeze_bn: BatchNorm layers normalise with their running statistics and do not update them."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def check_batchnorm_share(ids_per_rank: int, clips_per_rank: int, per_rank_bn: bool) -> str | None:
    """A warning when per-rank BatchNorm would see fewer than 2 identities (their statistics would be one
    identity's own); raises when it would see one clip (BatchNorm1d cannot normalise a batch of one)."""
    if not per_rank_bn or ids_per_rank >= 2:
        return None
    if clips_per_rank < 2:
        raise ConfigError(f"each rank's share of the batch is {clips_per_rank} clip: per-rank BatchNorm cannot "
                          "normalise it; use --sync_bn true, --freeze_bn true, fewer ranks or a larger P·K")
    return (f"warning: each rank's share of the batch holds {ids_per_rank} identity and BatchNorm is per rank: "
            "its statistics are that identity's own; use --sync_bn true or a larger P·K")


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.world = distributed.describe(cfg.device)  # no CUDA yet: DALI's workers must fork first
        self.is_main = self.world.is_main
        self.run_dir = Path(cfg.out)
        self.lock = None  # rank 0: the run folder's lock, held until close()
        self.loader = self.writer = self.log = None
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()  # the lock, the loader's workers: nothing of a run that never started stays behind
            raise

    def _build(self, cfg: TrainConfig, resume: str | None) -> None:
        distributed.check_restartable(os.environ)  # a launch that could not restart stops before anything starts
        self.precision = resolve_precision(cfg.precision, self.world.device)
        self.sync_bn = distributed.use_sync_bn(cfg.sync_bn, self.world)
        seed_everything(cfg.seed)
        from stenvan.data import build_train_loader

        manifest = load_manifest(cfg.data)
        self.split = cfg.split if cfg.split >= 0 else None  # iLIDS-VID, PRID-2011: the person split trained on
        check_split(manifest, self.split, training=True)
        self.loader = build_train_loader(
            cfg.data, P=cfg.ids_per_batch, K=cfg.tracklets_per_id, clip_len=cfg.clip_len, height=cfg.height,
            width=cfg.width, seed=cfg.seed, rank=self.world.rank, world_size=self.world.size, backend=cfg.loader,
            device=self.world.device, dtype=AMP_DTYPES[self.precision], workers=cfg.workers, flip_p=cfg.flip_p,
            pad=cfg.pad, erase_p=cfg.erase_p, batches_per_epoch=cfg.batches_per_epoch or None, person_split=self.split,
            manifest=manifest)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.num_classes = self.loader.num_classes
        self.dataset = dataset_fingerprint(manifest)  # stored in checkpoints, checked on resume
        # What the model learns, for eval.py's leakage check: the dataset, the split and its classes' identities.
        self.train_data = training_record(manifest["dataset"], self.split, set(self.loader.table.pids.tolist()))
        bn_warning = check_batchnorm_share(self.loader.plan.sampler.ids_per_rank, self.loader.batch_size,
                                           self.world.size > 1 and not self.sync_bn and not cfg.freeze_bn)
        # Rank 0 claims the run folder (its lock, for the whole run) and picks the checkpoint, every rank loads
        # it; through torchrun's store, because this must happen before the loader forks and so before CUDA and
        # the process group exist (see stenvan.training.resume).
        # One store namespace per person split: the 10-split runner trains them one after another in these processes.
        self.store = distributed.rendezvous(self.world, prefix="" if self.split is None else f"split{self.split}")
        checkpoint = agree_on_checkpoint(resume, self.run_dir, self.store, self.world.rank, self.world.size,
                                         claim=lambda: self._claim(fresh=resume is None), dataset=self.dataset,
                                         data=cfg.data)
        changes = check_resumable(*checkpoint, cfg, self.num_classes, self.steps_per_epoch, self.dataset) \
            if checkpoint else {}
        self.progress = Progress(**checkpoint[1]["progress"]) if checkpoint else Progress()
        self.loader.prepare(self.progress.epoch, self.progress.step_in_epoch)  # DALI workers fork here
        distributed.join(self.world, self.store)  # now CUDA and the process group
        # Every rank stops together when one fails: they agree on it at every step boundary (stenvan.training.failures).
        self.failures = Failures(self.world, self.store, distributed.host_group(self.world))
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels once (the original too)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and for `eval.py --untrained`
        # A resumed run takes every weight from the checkpoint: no ImageNet download (offline resume works).
        model = build_model_from_config(cfg, self.num_classes, pretrained=checkpoint is None)
        model.check_clip_length(cfg.clip_len)
        if checkpoint:
            model.load_state_dict(checkpoint[1]["model"], strict=True)
        if self.sync_bn:  # BatchNorm over the global batch, with no host-device sync (works on gloo too)
            model = convert_sync_batchnorm(model)
        model.to(self.world.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: saved in checkpoints and used for evaluation
        # The optimizer after the model moved: its state then lives beside the parameters.
        self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer,
                                         cfg.lr, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, self.steps_per_epoch, schedule=cfg.lr_schedule, epochs=cfg.epochs, step_epochs=cfg.lr_step_epochs,
            milestones=cfg.lr_milestones, gamma=cfg.lr_gamma, warmup_epochs=cfg.warmup_epochs))
        self.scaler = torch.amp.GradScaler(self.world.device.type, enabled=self.precision == "fp16")
        self.criterion = ReIDLoss(cfg.triplet, cfg.triplet_margin, cfg.triplet_weight, cfg.ce_weight,
                                  cfg.label_smoothing)
        self.meter = StepMeter(self.world.device)
        self.running_stats = RunningStatistics(model)  # put back after a skipped step
        if checkpoint:
            self._restore(*checkpoint, changes)
        forward = distributed.data_parallel(model, self.world, buffers_in_sync=self.sync_bn or cfg.freeze_bn)
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.log = RunLog(self.run_dir, enabled=self.is_main)
        self.writer = CheckpointWriter(self.run_dir, cfg.keep_ckpts, log=self.log.info) if self.is_main else None
        self._saved_step = self.progress.global_step if checkpoint else -1
        self.stop_signal = 0
        if self.is_main:
            atomic_write(self.run_dir / "config.yaml", cfg.to_yaml())
            self.log.info("config:\n" + "\n".join(f"  {k}: {v}" for k, v in cfg.to_dict().items()))
            self.log.info(f"world: {self.world.size} process(es) on {self.world.device}, precision {self.precision}, "
                          f"{self.num_classes} classes, {self.steps_per_epoch} steps/epoch, "
                          f"{self.loader.batch_size} clips per rank, BatchNorm "
                          + ("frozen" if cfg.freeze_bn else "per rank" if not self.sync_bn
                             else "synchronised over the global batch (no host sync)")
                          + (f"; gloo on {os.environ['GLOO_SOCKET_IFNAME']}" if self.world.size > 1
                             and os.environ.get("GLOO_SOCKET_IFNAME") else ""))
            if bn_warning:
                self.log.info(bn_warning)

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        p = self.progress
        return {"config": self.cfg.to_dict(), "arch": self.cfg.arch, "num_classes": self.num_classes,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": scaler_state(self.scaler),
                "progress": vars(p).copy(), "meter": self.meter.values, "rng": rng_state(),
                "world_size": self.world.size, "dataset": self.dataset, "precision": self.precision,
                "train_data": self.train_data}

    def _claim(self, fresh: bool) -> None:
        """Rank 0, before the resume choice: lock the run folder for the whole run, clean what killed checkpoint
        writes left there, refuse a fresh start over an earlier run's checkpoints (stenvan.training.run_folder)."""
        self.lock = claim_run_folder(self.run_dir, fresh, log=lambda line: print(line, flush=True))

    def save(self, reason: str, wait: bool = False) -> None:
        """Checkpoint this step in the background (main rank); wait=True: until it is on disk, on every rank (a
        write that failed then stops every rank, not rank 0 alone)."""
        error = None
        try:
            if self.is_main and self.progress.global_step != self._saved_step:
                self.writer.save(self.state(), step=self.progress.global_step, reason=reason)
                self._saved_step = self.progress.global_step
                self._last_save = time.monotonic()
            if wait and self.is_main:
                self.writer.wait()
        except CheckpointError as e:
            if not wait:
                raise
            error = e
        if wait:
            self._agree(error)  # also the barrier: nobody exits before the checkpoint is on disk

    def _checkpoint_due(self) -> bool:
        cfg, p = self.cfg, self.progress
        return self.is_main and bool((cfg.ckpt_every and p.global_step % cfg.ckpt_every == 0) or (
            cfg.ckpt_minutes and time.monotonic() - self._last_save >= 60 * cfg.ckpt_minutes))

    def _exclude_from_window(self, seconds: float) -> None:
        """Evaluations are not training time: keep them out of clips/s and the data-wait share."""
        if hasattr(self, "_window"):
            self._window["start"] += seconds

    def _restore(self, path: Path, state: dict, changes: dict) -> None:
        """Optimizer, scheduler, scaler, meter and RNG states (the model was loaded before it moved); the allowed
        config changes take effect and are printed (stenvan.training.resume_checks)."""
        notes = restore_training_state(state, changes, self.optimizer, self.scheduler, self.scaler, self.cfg,
                                       self.precision)
        if "meter" in state:  # the loss sums of the log window the checkpoint was taken in
            self.meter.values.copy_(state["meter"])
        set_rng_state(state["rng"])
        if self.is_main:
            print(f"resume: {path} at epoch {self.progress.epoch}, step {self.progress.global_step}"
                  + (f"; config changes: {', '.join(notes)}" if notes else ""), flush=True)

    # ------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # acted on after the current step, by every rank (see _next_batch)

    def fit(self) -> Progress:
        cfg, p = self.cfg, self.progress
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        autocast = amp_autocast(self.world.device, self.precision)
        from tqdm import tqdm

        total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        bar = tqdm(total=total_steps, initial=p.global_step, disable=None if self.is_main else True,
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        run_start, self._last_save = time.perf_counter(), time.monotonic()
        self._new_window()
        try:
            while p.epoch < cfg.epochs and not (cfg.max_steps and p.global_step >= cfg.max_steps):
                self.model.train()
                if cfg.freeze_bn:
                    set_bn_eval(self.model)
                # Iterating the epoch to its end lets the DALI pipeline run on into the next epoch.
                batches = iter(self.loader.epoch(p.epoch, start_step=p.step_in_epoch))
                while True:
                    batch, stop = self._next_batch(batches)
                    if stop:
                        self._stop(stop)
                        return p
                    if batch is None:  # the epoch's end
                        break
                    self._step(batch, autocast)
                    bar.update(1)
                    if p.global_step % cfg.log_every == 0:
                        self._sync_point()
                    if cfg.max_steps and p.global_step >= cfg.max_steps:
                        break
                    if self._checkpoint_due():
                        self.failures.keep(self.save, "periodic")
                if cfg.eval_every and p.step_in_epoch == 0 and p.epoch % cfg.eval_every == 0:
                    self.evaluate_during_training()
            self.save("max_steps" if cfg.max_steps and p.global_step >= cfg.max_steps else "end", wait=True)
        finally:
            bar.close()
            for s, handler in old_handlers.items():
                signal.signal(s, handler)
            if self.is_main:
                elapsed = time.perf_counter() - run_start
                self.log.info(f"checkpoints: {self.writer.written} written; training waited "
                              f"{self.writer.wait_s:.2f} s for them, {100 * self.writer.wait_s / elapsed:.2f}% "
                              f"of {elapsed:.1f} s")
        return p

    def _next_batch(self, batches) -> tuple[dict | None, int]:
        """(the epoch's next batch, None at its end; the stop signal any rank got, 0 if none), on every rank at the
        same step boundary, before this step's collectives: a stop signal is acted on here by every rank, and a
        rank whose loader failed (a shard changed under the job, a worker that died) stops them all here."""
        error = batch = None
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            pass
        except ShardFormatError as e:  # a shard changed under the job
            error = e
        except Exception as e:  # noqa: BLE001 - any loader failure: every rank stops, with this step's checkpoint
            error = LoaderFailed.of(e)
        fetched = time.perf_counter()
        self._window["wait_s"] += fetched - start
        stop = self._agree(error, loader=True)
        self._window["agree_s"] += time.perf_counter() - fetched  # the host agreement: its own share in the log
        return batch, stop

    def _agree(self, error: BaseException | None = None, loader: bool = False) -> int:
        """At a point every rank reaches together: the stop signal any rank got (0 if none), when no rank failed.
        If any rank failed (`error`, or one kept since), every rank stops with its line (stenvan.training.failures). A
        failure of a loader (or data) first saves the checkpoint of this step boundary (not at step 0: nothing to
        keep), so that the run continues here once the cause is fixed; with a stop signal pending, the failure is
        only reported and the run stops cleanly (the signal may have reached the loader too)."""
        agreed = self.failures.agree(error, loader=loader, stop_signal=self.stop_signal)
        if agreed.error is None or (agreed.loader and agreed.stop):
            if agreed.error is not None:
                self.log.info(f"stopping: a loader failed meanwhile: {agreed.error}")
            return agreed.stop
        error = agreed.error
        if agreed.loader and self.progress.global_step > 0:
            self.save("loader error", wait=True)
            saved = step_path(self.run_dir, self.progress.global_step)
            error = type(error)(f"{error}; stopped at step {self.progress.global_step}, saved as {saved}: continue "
                                "with --resume auto" + (" once the data is restored" if agreed.data else ""))
        raise error

    def _stop(self, signum: int) -> None:
        """Every rank, at the same step boundary: save this step (and wait for it), then say so."""
        step = self.progress.global_step
        self.save(f"stopped by signal {signum}", wait=True)
        self.log.info(f"stopped cleanly by signal {signum} at step {step}; continue with --resume auto")
        if not self.is_main:
            print(f"train: rank {self.world.rank} stopped cleanly by signal {signum} at step {step}", file=sys.stderr,
                  flush=True)

    def _step(self, batch: dict, autocast) -> None:
        """One optimizer step, or a skipped one if some rank's loss or the gradients are not finite; nothing here
        waits for the GPU."""
        p = self.progress
        running_stats = self.running_stats.snapshot()
        with autocast:
            feats, logits = self.forward(batch["clips"])  # (B, T, 3, H, W) -> (B, 2048), (B, #ids)
            losses = self.criterion(feats, logits, batch["labels"])
        bad = (~torch.isfinite(losses["loss"].detach())).float()  # 0-d: 1.0 = skip this step
        self.scaler.scale(losses["loss"]).backward()
        if not self.scaler.is_enabled():  # a finite loss may still have non-finite gradients (bf16 overflow)
            bad = torch.maximum(bad, nonfinite_gradients(self.optimizer))
        if self.world.size > 1:  # every rank skips the same steps (an all-reduce on the device, no host sync)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        self.running_stats.restore_if(bad, running_stats)  # a skipped step leaves BatchNorm as it was too
        if self.scaler.is_enabled():  # fp16: GradScaler skips steps with non-finite gradients on the device
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            step_unless(self.optimizer, bad)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.meter.update(losses, bad)
        p.global_step += 1
        p.step_in_epoch += 1
        self._window["steps"] += 1
        if p.step_in_epoch == self.steps_per_epoch:
            p.epoch, p.step_in_epoch = p.epoch + 1, 0

    def _sync_point(self) -> None:
        """Every `log_every` steps: the step meter reaches the host (the one sync), a log line, the non-finite
        stop."""
        p, cfg = self.progress, self.cfg
        stats = self.meter.read(self.world.size)
        self.meter.next_window()
        p.nonfinite_total += stats["skipped"]
        p.nonfinite_in_a_row = stats["run"]
        self.failures.keep(self._log_interval, stats)  # a full disk under metrics.jsonl stops every rank
        if stats["longest"] >= cfg.max_nonfinite:
            if self.is_main:
                self.writer.wait()  # so that last.pt below is the newest checkpoint
            last = self.run_dir / "last.pt"
            # A checkpoint never holds non-finite weights (stenvan.training.checkpoint_writer): last.pt is good.
            raise TrainingStopped(
                f"{stats['longest']} steps in a row with non-finite losses or gradients by step {p.global_step}; "
                "lower --lr, try --precision fp32, or check the data. "
                + (f"The last good checkpoint is {last}" if last.exists() else "No checkpoint was written yet"))

    def _ckpt_wait_s(self) -> float:
        return self.writer.wait_s if self.writer else 0.0

    def _new_window(self) -> None:
        """Start a log window: its steps, the seconds waited for data and for the ranks' agreement, its start."""
        self._window = {"steps": 0, "wait_s": 0.0, "agree_s": 0.0, "start": time.perf_counter(),
                        "ckpt_s": self._ckpt_wait_s()}

    def _log_interval(self, stats: dict) -> None:
        window, p = self._window, self.progress
        elapsed = time.perf_counter() - window["start"]
        clips_per_s = window["steps"] * self.loader.batch_size * self.world.size / elapsed
        values = {"epoch": p.epoch, "lr": self.scheduler.get_last_lr()[0], "clips_per_s": clips_per_s,
                  "frames_per_s": clips_per_s * self.cfg.clip_len, "data_wait_share": window["wait_s"] / elapsed,
                  "agree_wait_share": window["agree_s"] / elapsed,
                  "ckpt_wait_share": (self._ckpt_wait_s() - window["ckpt_s"]) / elapsed,
                  "nonfinite_total": p.nonfinite_total}
        # Losses are averaged over the steps that were not skipped (none: no loss to report).
        values.update({k: stats[k] for k in ("loss", "triplet", "ce") if k in stats})
        if stats["skipped"]:
            values["nonfinite_loss"] = stats["skipped"]
        if self.world.device.type == "cuda":
            values["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        losses = (f"loss {stats['loss']:.4f} (triplet {stats['triplet']:.4f}, ce {stats['ce']:.4f})" if "loss" in stats
                  else "no finite loss")
        line = (f"epoch {p.epoch} step {p.global_step} | {losses} | lr {values['lr']:.2e} | {clips_per_s:.1f} clips/s "
                f"{values['frames_per_s']:.0f} frames/s | data wait {100 * values['data_wait_share']:.0f}% | "
                + (f"rank agreement {100 * values['agree_wait_share']:.1f}% | " if self.world.size > 1 else "")
                + f"ckpt wait {100 * values['ckpt_wait_share']:.1f}%"
                + (f" | GPU mem {values['gpu_mem_gib']:.1f} GiB" if "gpu_mem_gib" in values else "")
                + (f" | {stats['skipped']} non-finite step(s) skipped, {stats['run']} in a row" if stats["skipped"]
                   else ""))
        self.log.record("train", p.global_step, values, line)
        self._new_window()

    def evaluate_during_training(self) -> None:
        """Evaluate on the test splits (main rank); saves best.pt only when select_on_test is asked for."""
        start = time.perf_counter()
        if self.is_main:
            self.failures.keep(self._evaluate)  # a shard changed under it stops every rank at the next step
        distributed.barrier()
        self.model.train()
        if self.cfg.freeze_bn:
            set_bn_eval(self.model)
        self._exclude_from_window(time.perf_counter() - start)

    def _evaluate(self) -> None:
        from stenvan.evaluation import selection_protocol
        from stenvan.evaluation.evaluate import evaluate_model

        results = evaluate_model(self.model, self.cfg.data, mode=self.cfg.eval_mode, clip_len=self.cfg.clip_len,
                                 height=self.cfg.height, width=self.cfg.width, device=self.world.device,
                                 precision=self.precision, loader=self.cfg.loader, workers=self.cfg.workers,
                                 split=self.split).results
        name = selection_protocol(self.train_data["dataset"])  # standard on MARS/DukeV
        scalars = {f"{proto}_{k}": v for proto, r in results.items() for k, v in r.items()
                   if isinstance(v, float) and math.isfinite(v)}  # NaN: nothing to score (JSON has no NaN)
        self.log.record("eval", self.progress.global_step, scalars,
                        f"eval epoch {self.progress.epoch}: {name} rank-1 {results[name]['rank1']:.3f} "
                        f"mAP {results[name]['mAP']:.3f}")
        if self.cfg.select_on_test and results[name]["mAP"] > self.progress.best_map:
            self.progress.best_map = results[name]["mAP"]
            self.writer.save(self.state(), path=self.run_dir / "best.pt", reason=f"best {name} mAP")
            self.log.info(f"best.pt: {name} mAP {self.progress.best_map:.4f} (selected on the test set)")

    def close(self) -> None:
        """Finish the in-flight checkpoint, stop the loader's workers, release the run folder (safe to call on a
        partly built Trainer)."""
        try:
            if self.writer is not None:
                self.writer.close()  # an in-flight checkpoint finishes before the process ends
        finally:
            if self.loader is not None:
                self.loader.close()
            if self.log is not None:
                self.log.close()
            distributed.cleanup()
            if self.lock is not None:
                self.lock.release()
                self.lock = None

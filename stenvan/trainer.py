"""The training run: components from the config, a loop that fits on a screen, and nothing ever lost.

One code path for CPU, one GPU and N GPUs on M nodes (torchrun). Checkpoints hold the full state and are
written atomically every `ckpt_every` steps, at every epoch end, at `max_steps`, and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stenvan import distributed
from stenvan.amp import autocast as amp_autocast
from stenvan.amp import resolve_precision
from stenvan.checkpoint import (CheckpointError, newest_valid_checkpoint, read_checkpoint, save_checkpoint,
                                write_checkpoint_file)
from stenvan.config import TrainConfig, config_from_dict
from stenvan.losses import ReIDLoss
from stenvan.rng import rng_state, seed_everything, set_rng_state
from stenvan.runlog import RunLog
from stenvan.schedule import lr_factor
from stenvan.shards import atomic_write

class TrainingStopped(Exception):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


@dataclass
class Progress:
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # index of the next batch within the epoch (the sampler position)
    global_step: int = 0  # optimizer steps taken (including skipped non-finite ones)
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    best_map: float = -1.0  # best test mAP so far (select_on_test only)


def build_model_from_config(cfg: TrainConfig, num_classes: int, pretrained: bool = True) -> torch.nn.Module:
    from stenvan.models import build_model

    weights = None if (not pretrained or cfg.pretrained == "none") else cfg.pretrained
    options = {"attention": cfg.attention} if cfg.arch != "baseline" else {}
    if cfg.arch == "ste_nvan":  # stripes and temporal attention are STE-NVAN's options only
        options.update(stripes=cfg.stripes, temporal_attention=cfg.temporal_attention)
    return build_model(cfg.arch, num_classes, stem_relu=cfg.stem_relu, pretrained=weights, **options)


def set_bn_eval(module: torch.nn.Module) -> None:
    """freeze_bn: BatchNorm layers normalise with their running statistics and do not update them."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.world = distributed.describe(cfg.device)  # no CUDA yet: DALI's workers must fork first
        self.is_main = self.world.is_main
        self.run_dir = Path(cfg.out)
        self.precision = resolve_precision(cfg.precision, self.world.device)
        seed_everything(cfg.seed)
        from stenvan.data import build_train_loader

        self.loader = build_train_loader(
            cfg.data, P=cfg.ids_per_batch, K=cfg.tracklets_per_id, clip_len=cfg.clip_len, height=cfg.height,
            width=cfg.width, seed=cfg.seed, rank=self.world.rank, world_size=self.world.size, backend=cfg.loader,
            device=self.world.device, dtype=torch.float32, workers=cfg.workers, flip_p=cfg.flip_p, pad=cfg.pad,
            erase_p=cfg.erase_p, batches_per_epoch=cfg.batches_per_epoch or None)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.num_classes = self.loader.num_classes
        checkpoint = self._find_checkpoint(resume) if resume else None
        self.progress = Progress(**checkpoint[1]["progress"]) if checkpoint else Progress()
        if self.progress.step_in_epoch >= self.steps_per_epoch:
            raise CheckpointError(f"{checkpoint[0]}: saved at step {self.progress.step_in_epoch} of an epoch, but "
                                  f"this run has {self.steps_per_epoch} steps per epoch; resume with the run's "
                                  "batches_per_epoch")
        self.loader.prepare(self.progress.epoch, self.progress.step_in_epoch)  # DALI workers fork here
        distributed.join(self.world)  # now CUDA and the process group
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and for `eval.py --untrained`
        model = build_model_from_config(cfg, self.num_classes)
        model.check_clip_length(cfg.clip_len)
        if checkpoint:
            model.load_state_dict(checkpoint[1]["model"], strict=True)
        if cfg.sync_bn and self.world.size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.world.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: saved in checkpoints and used for evaluation
        # The optimizer after the model moved: its state then lives beside the parameters.
        params = [p for p in model.parameters() if p.requires_grad]
        kernel = {"fused": True} if self.world.device.type == "cuda" else {"foreach": True}
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, **kernel)
        else:
            opt_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
            self.optimizer = opt_class(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, self.steps_per_epoch, schedule=cfg.lr_schedule, epochs=cfg.epochs, step_epochs=cfg.lr_step_epochs,
            milestones=cfg.lr_milestones, gamma=cfg.lr_gamma, warmup_epochs=cfg.warmup_epochs))
        self.scaler = torch.amp.GradScaler(self.world.device.type, enabled=self.precision == "fp16")
        self.criterion = ReIDLoss(cfg.triplet, cfg.triplet_margin, cfg.triplet_weight, cfg.ce_weight,
                                  cfg.label_smoothing)
        if checkpoint:
            self._restore(*checkpoint)
        forward = model
        if self.world.size > 1:
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.world.local_rank] if self.world.device.type == "cuda" else None)
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.log = RunLog(self.run_dir, enabled=self.is_main)
        self.stop_signal = 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", cfg.to_yaml())
            self.log.info("config:\n" + "\n".join(f"  {k}: {v}" for k, v in cfg.to_dict().items()))
            self.log.info(f"world: {self.world.size} process(es) on {self.world.device}, precision {self.precision}, "
                          f"{self.num_classes} classes, {self.steps_per_epoch} steps/epoch")

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        p = self.progress
        return {"config": self.cfg.to_dict(), "arch": self.cfg.arch, "num_classes": self.num_classes,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "progress": vars(p).copy(), "rng": rng_state(), "world_size": self.world.size}

    def save(self, reason: str) -> None:
        start = time.perf_counter()
        if self.is_main:
            path = save_checkpoint(self.state(), self.run_dir, self.progress.global_step, self.cfg.keep_ckpts)
            self.log.info(f"checkpoint: {path} ({reason})")
        distributed.barrier()  # nobody runs ahead (or exits) before the checkpoint is on disk
        self._exclude_from_window(time.perf_counter() - start)

    def _exclude_from_window(self, seconds: float) -> None:
        """Checkpoints and evaluations are not training time: keep them out of clips/s and the data-wait share."""
        if hasattr(self, "_window"):
            self._window["start"] += seconds

    def _find_checkpoint(self, resume: str) -> tuple[Path, dict] | None:
        """('auto': the newest valid checkpoint in the run folder; else the given file), checked against this run."""
        if resume == "auto":
            found = newest_valid_checkpoint(self.run_dir)
            if found is None:
                if self.is_main:
                    print(f"resume: no checkpoint in {self.run_dir}, starting from scratch", flush=True)
                return None
            path, state = found
        else:
            path, state = Path(resume), read_checkpoint(resume)
        saved = config_from_dict(state["config"])
        if saved.arch != self.cfg.arch or state["num_classes"] != self.num_classes:
            raise CheckpointError(f"{path}: holds a {saved.arch} model with {state['num_classes']} classes, this run "
                                  f"builds {self.cfg.arch} with {self.num_classes}; use another --out")
        return path, state

    def _restore(self, path: Path, state: dict) -> None:
        """Optimizer, scheduler, scaler and RNG states (the model was loaded before it moved to the device)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if self.is_main:
            changed = {k: v for k, v in self.cfg.to_dict().items() if state["config"].get(k) != v}
            print(f"resume: {path} at epoch {self.progress.epoch}, step {self.progress.global_step}"
                  + (f"; config changes: {changed}" if changed else ""), flush=True)

    # ------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # acted on at the end of the current step, on every rank together

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
        sums = torch.zeros(4, device=self.world.device)  # loss, triplet, ce, good steps: summed on the device
        self._window = {"steps": 0, "wait_s": 0.0, "start": time.perf_counter()}
        try:
            while p.epoch < cfg.epochs and not (cfg.max_steps and p.global_step >= cfg.max_steps):
                self.model.train()
                if cfg.freeze_bn:
                    set_bn_eval(self.model)
                # Iterating the epoch to its end lets the DALI pipeline run on into the next epoch.
                t0 = time.perf_counter()
                for batch in self.loader.epoch(p.epoch, start_step=p.step_in_epoch):
                    self._window["wait_s"] += time.perf_counter() - t0
                    stop = self._step(batch, autocast, sums)
                    bar.update(1)
                    if p.global_step % cfg.log_every == 0:
                        self._log_interval(sums, len(batch["labels"]))
                        sums.zero_()
                    if stop:
                        self.save(f"stopped by signal {int(stop)}")
                        self.log.info("stopped cleanly; continue with --resume auto")
                        return p
                    if cfg.max_steps and p.global_step >= cfg.max_steps:
                        self.save(f"max_steps={cfg.max_steps}")
                        return p
                    if cfg.ckpt_every and p.global_step % cfg.ckpt_every == 0 and p.step_in_epoch:
                        self.save("periodic")
                    t0 = time.perf_counter()
                if cfg.eval_every and p.epoch % cfg.eval_every == 0:
                    self.evaluate_during_training()  # before the save, so the checkpoint holds best_map
                self.save("epoch end")
        finally:
            bar.close()
            for s, handler in old_handlers.items():
                signal.signal(s, handler)
        return p

    def _step(self, batch: dict, autocast, sums: torch.Tensor) -> float:
        """One optimizer step (or a skipped one); returns the stop signal agreed by every rank (0: none)."""
        p = self.progress
        with autocast:
            feats, logits = self.forward(batch["clips"])  # (B, T, 3, H, W) -> (B, 2048), (B, #ids)
            losses = self.criterion(feats, logits, batch["labels"])
        self.scaler.scale(losses["loss"]).backward()
        # A small all-reduce and a host sync every step: every rank must skip a non-finite step, and stop on
        # a signal, at the same step. It costs one pipeline bubble per step on a GPU.
        flags = torch.stack([(~torch.isfinite(losses["loss"].detach())).float(),
                             torch.tensor(float(self.stop_signal), device=self.world.device)])
        if self.world.size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        nonfinite, stop = flags.tolist()
        if nonfinite:
            self._skip_nonfinite(losses)
        else:
            p.nonfinite_in_a_row = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            sums += torch.stack([losses["loss"].detach().float(), losses["triplet"], losses["ce"],
                                 torch.ones((), device=self.world.device)])
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        p.global_step += 1
        p.step_in_epoch += 1
        self._window["steps"] += 1
        if p.step_in_epoch == self.steps_per_epoch:
            p.epoch, p.step_in_epoch = p.epoch + 1, 0
        if p.nonfinite_in_a_row >= self.cfg.max_nonfinite:
            last = self.run_dir / "last.pt"
            raise TrainingStopped(
                f"{p.nonfinite_in_a_row} non-finite losses in a row at step {p.global_step}; lower --lr, try "
                "--precision fp32, or check the data. " + (f"The last good checkpoint is {last}" if last.exists()
                                                            else "No checkpoint was written yet"))
        return stop

    def _skip_nonfinite(self, losses: dict) -> None:
        p = self.progress
        p.nonfinite_total += 1
        p.nonfinite_in_a_row += 1
        self.log.record("train", p.global_step + 1, {"nonfinite_loss": 1, "nonfinite_total": p.nonfinite_total},
                        f"step {p.global_step + 1}: non-finite loss (triplet {losses['triplet'].item():.4g}, ce "
                        f"{losses['ce'].item():.4g}); step skipped ({p.nonfinite_in_a_row} in a row)")
        if self.precision == "fp16":
            self.scaler.update(self.scaler.get_scale() / 2)  # back off, as GradScaler does on inf gradients

    def _log_interval(self, sums: torch.Tensor, batch_size: int) -> None:
        # The one regular host-device sync point: the loss sums come to the host here.
        if self.world.device.type == "cuda":
            torch.cuda.synchronize()
        if self.world.size > 1:  # global means: the same numbers whatever the number of processes
            torch.distributed.all_reduce(sums)
            sums /= self.world.size
        window = self._window
        elapsed = time.perf_counter() - window["start"]
        steps = max(window["steps"], 1)
        good = max(sums[3].item(), 1.0)  # losses are averaged over the steps that were not skipped
        loss, triplet, ce = (sums[:3] / good).tolist()
        clips_per_s = steps * batch_size * self.world.size / elapsed
        p = self.progress
        values = {"epoch": p.epoch, "loss": loss, "triplet": triplet, "ce": ce, "lr": self.scheduler.get_last_lr()[0],
                  "clips_per_s": clips_per_s, "frames_per_s": clips_per_s * self.cfg.clip_len,
                  "data_wait_share": window["wait_s"] / elapsed, "nonfinite_total": p.nonfinite_total}
        if self.world.device.type == "cuda":
            values["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        line = (f"epoch {p.epoch} step {p.global_step} | loss {loss:.4f} (triplet {triplet:.4f}, ce {ce:.4f}) | "
                f"lr {values['lr']:.2e} | {clips_per_s:.1f} clips/s {values['frames_per_s']:.0f} frames/s | "
                f"data wait {100 * values['data_wait_share']:.0f}%"
                + (f" | GPU mem {values['gpu_mem_gib']:.1f} GiB" if "gpu_mem_gib" in values else ""))
        self.log.record("train", p.global_step, values, line)
        self._window = {"steps": 0, "wait_s": 0.0, "start": time.perf_counter()}

    def evaluate_during_training(self) -> None:
        """Evaluate on the test splits (main rank); saves best.pt only when select_on_test is asked for."""
        start = time.perf_counter()
        if self.is_main:
            from stenvan.evaluate import evaluate_model

            results = evaluate_model(self.model, self.cfg.data, mode=self.cfg.eval_mode, clip_len=self.cfg.clip_len,
                                     height=self.cfg.height, width=self.cfg.width, device=self.world.device,
                                     precision=self.precision, loader=self.cfg.loader, workers=self.cfg.workers)
            scalars = {f"{proto}_{k}": v for proto, r in results.items() for k, v in r.items()
                       if isinstance(v, float)}
            self.log.record("eval", self.progress.global_step, scalars,
                            f"eval epoch {self.progress.epoch}: standard rank-1 {results['standard']['rank1']:.3f} "
                            f"mAP {results['standard']['mAP']:.3f}")
            if self.cfg.select_on_test and results["standard"]["mAP"] > self.progress.best_map:
                self.progress.best_map = results["standard"]["mAP"]
                write_checkpoint_file(self.state(), self.run_dir / "best.pt")
                self.log.info(f"best.pt: standard mAP {self.progress.best_map:.4f} (selected on the test set)")
        distributed.barrier()
        self.model.train()
        if self.cfg.freeze_bn:
            set_bn_eval(self.model)
        self._exclude_from_window(time.perf_counter() - start)

    def close(self) -> None:
        self.loader.close()
        self.log.close()
        distributed.cleanup()

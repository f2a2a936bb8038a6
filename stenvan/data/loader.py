"""The training and evaluation loaders: one contract, two backends (`dali`, the default, and `torch`).

    loader = build_train_loader("shards/mars", P=8, K=4, clip_len=8, height=256, width=128, seed=0,
                                device=torch.device("cuda"))
    for batch in loader.epoch(epoch, start_step=step):   # resumable at any step
        batch["clips"]   # (B, T, 3, H, W) normalised, `dtype`, on `device`; B = P·K / world_size
        batch["labels"], batch["camids"], batch["tracklet"]   # (B,) int64 on `device` (copied without blocking)

    for batch in build_eval_loader("shards/mars", "query", mode="paper", clip_len=8, height=256, width=128,
                                   batch_size=64, device=device):
        batch["clips"], batch["keys"], batch["pids"], batch["camids"], batch["tracklet"]   # metadata on the CPU
        batch["real_frames"]   # (B,) distinct frames per clip: the clip's weight in its tracklet's mean feature

The clips are channels_last: stored (B, T, H, W, 3), so `clips.flatten(0, 1)` (what the model does first) is a
(B·T, 3, H, W) channels_last tensor without a copy. Both backends execute the same `ClipSpec`s
(stenvan.data.sampling), so for the same seed they load the same tracklets, frames and augmentation; only the
decoder and the resize kernel differ. A shard truncated, overwritten, replaced or deleted under a running job ends
the iteration with a `ShardChangedError` (a ShardFormatError) naming it; loader workers die with their process.
"""

from __future__ import annotations

import functools
import os
from typing import Iterator

import torch

from stenvan.data import dali_loader
from stenvan.data.clips import WorkerFailure, as_clips, load_clip, normalize
from stenvan.data.lifeline import start_workers, tie_to_parent
from stenvan.data.sampling import Augment, IdentitySampler, TrainPlan, eval_clips
from stenvan.data.table import ShardChangedError, TrackletTable
from stenvan.shards import ShardFormatError

BACKENDS = ("dali", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(backend: str, dtype: torch.dtype, clip_len: int, height: int, width: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; use one of {', '.join(map(repr, BACKENDS))}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype} is not valid; use torch.float32, torch.bfloat16 or torch.float16")
    if clip_len < 1 or height < 1 or width < 1:
        raise ValueError(f"clip_len, height and width must be positive, got {clip_len}, {height}, {width}")


# ----------------------------------------------------------------------------------------------------------
# Torch backend: a DataLoader whose batch sampler yields ClipSpecs computed in the main process
# ----------------------------------------------------------------------------------------------------------

class _ClipDataset(torch.utils.data.Dataset):
    """dataset[spec] -> (clip (T, H, W, 3), tracklet, label, camid); frames read from this process's files.

    The clip is normalised to `dtype` here when the loader delivers to the CPU (the workers share the work);
    for a GPU it stays uint8 (4× less to copy) and the main process normalises it on the device.
    """

    def __init__(self, table: TrackletTable, label_of, height: int, width: int, dtype: torch.dtype | None):
        self.table, self.store, self.height, self.width, self.dtype = table, table.store(), height, width, dtype
        self.label_of = label_of  # per tracklet: train label, or pid for eval

    def __getitem__(self, spec):
        try:
            clip = load_clip(self.table, self.store, spec, self.height, self.width)  # (T, 3, H, W)
        except ShardFormatError as e:
            return WorkerFailure(str(e))
        if self.dtype is not None:  # normalising (T, 3, H, W) and then copying is faster than normalising HWC
            clip = normalize(clip, self.dtype)
        i = spec.tracklet
        return clip.permute(0, 2, 3, 1).contiguous(), i, int(self.label_of[i]), int(self.table.camids[i])

    def __len__(self):  # indices are ClipSpecs from the batch sampler, not positions
        raise TypeError("_ClipDataset is indexed by ClipSpec through a batch sampler")


def _collate(items):
    """-> (clips (B, T, H, W, 3), tracklets, labels, camids (B,) int64), or the first WorkerFailure."""
    failed = WorkerFailure.first(items)
    if failed is not None:
        return failed
    clips, tracklets, labels, camids = zip(*items)
    return (torch.stack(clips), *(torch.tensor(v, dtype=torch.int64) for v in (tracklets, labels, camids)))


def _torch_batches(loader):
    """The DataLoader's batches, with a shard error raised here as one clean ShardChangedError."""
    with start_workers(tie_forked=False):  # the workers start with the iterator (they tie themselves)
        batches = iter(loader)
    for batch in batches:
        if isinstance(batch, WorkerFailure):
            raise ShardChangedError(batch.message)
        yield batch


def _on_device(clips: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H, W, 3) from the workers (uint8 for a GPU, already normalised for the CPU) -> (B, T, 3, H, W)
    normalised on `device`, channels_last memory."""
    if clips.dtype == torch.uint8:  # pinned by the DataLoader: the copy overlaps
        clips = normalize(clips.to(device, non_blocking=True), dtype, channel_dim=-1)
    return as_clips(clips)


def _worker_init(_, parent_pid: int):
    tie_to_parent(parent_pid)  # a killed trainer takes its workers with it; its stop signal leaves them be
    torch.set_num_threads(1)  # one decode per worker process; the parallelism is the workers


class SpecBatches:
    """Batch sampler: a list of ClipSpecs per batch; the loader sets what to iterate before each pass."""

    def __init__(self):
        self.batches = lambda: iter(())
        self.count = 0

    def __iter__(self):
        return self.batches()

    def __len__(self):
        return self.count


def _torch_dataloader(table, label_of, height, width, workers, device, dtype, batches: SpecBatches):
    # Pinned batches (where CUDA exists) let the clips and labels go to the device without blocking.
    return torch.utils.data.DataLoader(
        _ClipDataset(table, label_of, height, width, dtype if device.type == "cpu" else None),
        batch_sampler=batches, num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
        worker_init_fn=functools.partial(_worker_init, parent_pid=os.getpid()) if workers else None,
        persistent_workers=workers > 0, prefetch_factor=2 if workers else None)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor to `device` without blocking the host: from pinned memory where CUDA is the target."""
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

class TrainLoader:
    """P×K batches of augmented clips; `epoch(e, start_step=s)` yields exactly the batches s.. of epoch e.

    Iterate one epoch at a time. With the DALI backend, consuming an epoch to its end lets the next epoch
    continue on the same pipeline; any other request (a resume, a skipped epoch, an epoch left unfinished)
    builds a fresh pipeline that starts at the requested step.
    """

    def __init__(self, table: TrackletTable, plan: TrainPlan, *, backend: str, device: torch.device,
                 dtype: torch.dtype, workers: int, clip_len: int, height: int, width: int,
                 hw_decoder_load: float | None = None):
        self.table, self.plan, self.backend, self.hw_decoder_load = table, plan, backend, hw_decoder_load
        self.device, self.dtype, self.workers = device, dtype, workers
        self.clip_len, self.height, self.width = clip_len, height, width
        self._pipe, self._continues_at = None, None  # DALI: pipeline, and the (epoch, 0) it would run next
        self._source = None  # DALI: the pipeline's source
        self._batches, self._torch = SpecBatches(), None

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def num_classes(self) -> int:
        return int(self.table.labels.max()) + 1  # labels are 0..n-1 over every train identity

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        if epoch < 0 or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"epoch {epoch}, start_step {start_step}: steps run 0..{self.steps_per_epoch - 1}")
        if start_step == self.steps_per_epoch:
            return iter(())
        return self._dali(epoch, start_step) if self.backend == "dali" else self._torch_epoch(epoch, start_step)

    def prepare(self, epoch: int, start_step: int = 0) -> None:
        """Build the DALI pipeline for `epoch(epoch, start_step)` now, e.g. so that its worker processes fork
        before CUDA is initialised (no-op for the torch backend)."""
        if self.backend == "dali" and (self._pipe is None or self._continues_at != (epoch, start_step)):
            self.close()
            self._source = dali_loader.TrainSource(self.table, self.plan, self.clip_len, self.height, self.width,
                                                   epoch, start_step)
            self._pipe = dali_loader.build_pipeline(
                self._source, batch_size=self.batch_size, height=self.height, width=self.width, device=self.device,
                workers=self.workers, half=self.dtype == torch.float16, hw_decoder_load=self.hw_decoder_load)
            self._continues_at = (epoch, start_step)

    def _dali(self, epoch: int, start_step: int) -> Iterator[dict]:
        self.prepare(epoch, start_step)
        self._continues_at = None
        pipe, device = self._pipe, self.device
        try:
            for batch in dali_loader.run_pipeline(pipe, self._source, device, self.dtype):
                yield {"clips": batch["clips"], "labels": _to_device(batch["labels"], device),
                       "camids": _to_device(batch["camids"], device),
                       "tracklet": _to_device(batch["tracklet"], device)}
        except ShardFormatError:
            self.close()  # the pipeline's workers failed: a later request builds a fresh one
            raise
        if pipe is self._pipe:
            self._continues_at = (epoch + 1, 0)

    def _torch_epoch(self, epoch: int, start_step: int) -> Iterator[dict]:
        plan = self.plan
        self._batches.batches = lambda: (plan.batch(epoch, s) for s in range(start_step, plan.steps_per_epoch))
        self._batches.count = plan.steps_per_epoch - start_step
        if self._torch is None:
            self._torch = _torch_dataloader(self.table, self.table.labels, self.height, self.width, self.workers,
                                            self.device, self.dtype, self._batches)
        device = self.device
        for clips, tracklets, labels, camids in _torch_batches(self._torch):
            yield {"clips": _on_device(clips, device, self.dtype), "labels": _to_device(labels, device),
                   "camids": _to_device(camids, device), "tracklet": _to_device(tracklets, device)}

    def close(self) -> None:
        dali_loader.close_pipeline(self._pipe)
        self._pipe, self._continues_at, self._source = None, None, None
        self._torch = None  # the DataLoader's persistent workers end with it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_train_loader(shard_dir, *, P: int, K: int, clip_len: int, height: int, width: int, seed: int,
                       rank: int = 0, world_size: int = 1, backend: str = "dali",
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, workers: int = 2,
                       flip_p: float = 0.5, pad: int = 0, erase_p: float = 0.0,
                       batches_per_epoch: int | None = None, person_split: int | None = None,
                       manifest: dict | None = None, hw_decoder_load: float | None = None) -> TrainLoader:
    """The training loader over the `train` split of a shard folder (see the module docstring); `person_split`
    (iLIDS-VID, PRID-2011): that split's train persons only, labelled 0..n-1 (stenvan.person_splits). `manifest`:
    the folder's, if the caller has loaded it already. `hw_decoder_load`: see `dali_loader.build_pipeline`."""
    _check(backend, dtype, clip_len, height, width)
    device = torch.device(device)
    table = TrackletTable.from_dir(shard_dir, "train", person_split, manifest)
    sampler = IdentitySampler(table.labels, P, K, seed, rank=rank, world_size=world_size,
                              batches_per_epoch=batches_per_epoch)
    plan = TrainPlan(sampler, table.num_frames, clip_len, Augment(height, width, flip_p, pad, erase_p))
    return TrainLoader(table, plan, backend=backend, device=device, dtype=dtype, workers=workers,
                       clip_len=clip_len, height=height, width=width, hw_decoder_load=hw_decoder_load)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------

class EvalLoader:
    """Every tracklet of a split, in manifest order; in `dense` mode a tracklet gives several clips in a row.

    Each batch carries, per clip, the tracklet's key, pid, camera and index (`tracklet`) into `table.tracklets`
    (the metadata comes out of the same pipeline as the pixels), and `real_frames`: how many distinct frames of
    the tracklet the clip holds, the weight of its feature in the tracklet's mean (every frame then weighs the
    same, see `sampling.dense_chunks`). The last batch may be smaller.
    """

    def __init__(self, table: TrackletTable, clips: list, *, batch_size: int, backend: str, device: torch.device,
                 dtype: torch.dtype, workers: int, clip_len: int, height: int, width: int):
        self.table, self.clips, self.batch_size, self.backend = table, clips, batch_size, backend
        self.device, self.dtype, self.workers = device, dtype, workers
        self.clip_len, self.height, self.width = clip_len, height, width
        self.real_frames = torch.tensor([len(set(c.frames)) for c in clips], dtype=torch.int64)
        self._pipe, self._source, self._pipe_ready = None, None, False

    def __len__(self) -> int:
        return -(-len(self.clips) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        keys, bs = self.table.keys, self.batch_size
        for k, batch in enumerate(self._dali() if self.backend == "dali" else self._torch()):
            tracklet = batch["tracklet"]
            yield {**batch, "keys": [keys[i] for i in tracklet.tolist()],
                   "real_frames": self.real_frames[k * bs:k * bs + len(tracklet)]}

    def _dali(self) -> Iterator[dict]:
        if not self._pipe_ready:
            self.close()
            self._source = dali_loader.EvalSource(self.table, self.clips, self.clip_len, self.height, self.width,
                                                  self.batch_size)
            self._pipe = dali_loader.build_pipeline(
                self._source, batch_size=self.batch_size, height=self.height, width=self.width, device=self.device,
                workers=self.workers, half=self.dtype == torch.float16)
        self._pipe_ready, pipe, left = False, self._pipe, len(self.clips)
        try:
            for batch in dali_loader.run_pipeline(pipe, self._source, self.device, self.dtype):
                n = min(left, self.batch_size)  # the last batch is padded with copies: drop them
                left -= n
                yield {"clips": batch["clips"][:n], "pids": batch["labels"][:n], "camids": batch["camids"][:n],
                       "tracklet": batch["tracklet"][:n]}
        except ShardFormatError:
            self.close()
            raise
        self._pipe_ready = pipe is self._pipe

    def _torch(self) -> Iterator[dict]:
        batches = SpecBatches()
        specs, bs = self.clips, self.batch_size
        batches.batches = lambda: (specs[i:i + bs] for i in range(0, len(specs), bs))
        batches.count = len(self)
        loader = _torch_dataloader(self.table, self.table.pids, self.height, self.width, self.workers, self.device,
                                   self.dtype, batches)
        for clips, tracklet, pids, camids in _torch_batches(loader):
            yield {"clips": _on_device(clips, self.device, self.dtype), "pids": pids, "camids": camids,
                   "tracklet": tracklet}

    def close(self) -> None:
        dali_loader.close_pipeline(self._pipe)
        self._pipe, self._source, self._pipe_ready = None, None, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_eval_loader(shard_dir, split: str, *, mode: str = "paper", clip_len: int, height: int, width: int,
                      batch_size: int, backend: str = "dali", device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, workers: int = 2,
                      person_split: int | None = None, table: TrackletTable | None = None) -> EvalLoader:
    """Every tracklet of `split` ("train", "query", "gallery"; LS-VID's "val") in order, of person split
    `person_split` if given: `paper` = one clip of the first frames of the T chunks; `dense` = every frame once, in
    clips that weigh each frame the same (`sampling.dense_chunks`). `table`: that split's table (of that person
    split), if the caller has read it already."""
    _check(backend, dtype, clip_len, height, width)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    table = table if table is not None else TrackletTable.from_dir(shard_dir, split, person_split)
    return EvalLoader(table, eval_clips(table.num_frames, clip_len, mode), batch_size=batch_size, backend=backend,
                      device=torch.device(device), dtype=dtype, workers=workers, clip_len=clip_len, height=height,
                      width=width)

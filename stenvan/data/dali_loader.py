"""The DALI pipeline: its samples are frames. A batch of B clips is B·T frames, clip i's frame t at position
i·T + t, so ONE decoder (`mixed` = nvJPEG on a GPU, `cpu` without one; PNG frames decode on the host in either
mode) decodes all B·T frames of a batch at once
(T decoders of B frames each would give nvJPEG batches of 4 frames at 8 GPUs). Each frame carries its clip's
augmentation parameters, so resizing (only frames not already H×W), pad-and-crop, erasing, flipping and
normalising apply per frame and identically to every frame of a clip. The output is HWC per frame: the
(B·T, H, W, 3) batch viewed as (B, T, 3, H, W) is channels_last memory (`clips.as_clips`), with no copy.

The callbacks are stateless: each frame is recomputed from its `SampleInfo` through the picklable plan (all
randomness comes from the plan, never from DALI's random operators), so a pipeline can start at any step.
"""

from __future__ import annotations

import ctypes
import gc
import os

import numpy as np
import torch

from stenvan.data.clips import IMAGENET_MEAN, IMAGENET_STD, MEAN_PIXEL, as_clips, frame_size
from stenvan.data.lifeline import start_workers, tie_to_parent
from stenvan.data.table import ShardChangedError
from stenvan.decode import dali_decode


def extra_outputs(pad: bool, erase: bool) -> tuple[str, ...]:
    """Names of the source's outputs after the encoded frame (only those the pipeline uses)."""
    return ("needs_resize", "flip", *(("crop",) if pad else ()),
            *(("erase_anchor", "erase_shape") if erase else ()), "label", "camid", "tracklet")


class _SourceBase:
    """Common part of the callbacks: frame t of a clip -> the tuple of arrays the pipeline consumes."""

    def __init__(self, table, clip_len: int, height: int, width: int, label_of: np.ndarray, pad: bool,
                 erase: bool):
        self.table, self.store = table, table.store()
        self.clip_len, self.height, self.width = clip_len, height, width
        self.label_of = label_of  # per tracklet: train label, or pid for eval
        self.pad, self.erase = pad, erase
        self.names = extra_outputs(pad, erase)
        self.parent_pid = os.getpid()  # the process that builds the pipeline and starts its workers
        self._memo: dict = {}  # clip -> (frame locations, per-frame outputs), see _clip

    def __getstate__(self):  # a spawned worker starts with an empty memo
        return {**self.__dict__, "_memo": {}}

    def __setstate__(self, state):
        self.__dict__.update(state)
        # Unpickled in a spawned worker as it starts: die with the trainer (forked ones: see build_pipeline).
        tie_to_parent(self.parent_pid)

    def _clip(self, key, make_spec) -> tuple:
        """(frame locations, the clip's per-frame outputs) of the clip `key`, made once per process: each of the
        clip's T frames asks for them (DALI copies a sample's arrays, so its frames may share them)."""
        clip = self._memo.get(key)
        if clip is None:
            if len(self._memo) > 4096:  # a few batches' worth; older clips are not asked for again
                self._memo.clear()
            spec = make_spec()
            top, left, h, w = spec.erase
            clip = self._memo[key] = (
                self.table.frame_locations(spec.tracklet, spec.frames),
                (np.array(spec.flip, dtype=np.int32),
                 *((np.array(spec.crop, dtype=np.int32),) if self.pad else ()),
                 *((np.array((top, left), dtype=np.float32), np.array((h, w), dtype=np.float32)) if self.erase
                   else ()),
                 np.array(self.label_of[spec.tracklet], dtype=np.int64),
                 np.array(self.table.camids[spec.tracklet], dtype=np.int64),
                 np.array(spec.tracklet, dtype=np.int64)))
        return clip

    def frame(self, clip: tuple, t: int) -> tuple:
        """Frame t of a clip from `_clip`: (encoded JPEG or PNG, needs_resize, the clip's outputs...)."""
        locations, outputs = clip
        data = self.store.read(*locations[t])
        return (data, np.array(frame_size(data) != (self.height, self.width)), *outputs)


class TrainSource(_SourceBase):
    """Epoch k of the pipeline is epoch `first_epoch + k`; its first one starts at `first_step`."""

    def __init__(self, table, plan, clip_len: int, height: int, width: int, first_epoch: int, first_step: int):
        super().__init__(table, clip_len, height, width, table.labels, pad=plan.aug.pad > 0,
                         erase=plan.aug.erase_p > 0)
        self.plan, self.first_epoch, self.first_step = plan, first_epoch, first_step

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        step = info.iteration + (self.first_step if info.epoch_idx == 0 else 0)
        if step >= self.plan.steps_per_epoch:
            raise StopIteration
        clip, t = divmod(info.idx_in_batch, self.clip_len)
        return self.frame(self._clip((epoch, step, clip), lambda: self.plan.sample(epoch, step, clip)), t)


class EvalSource(_SourceBase):
    """The clip list, padded with copies of its last clip to whole batches (the loader drops the copies)."""

    def __init__(self, table, clips: list, clip_len: int, height: int, width: int, batch_size: int):
        super().__init__(table, clip_len, height, width, table.pids, pad=False, erase=False)
        self.clips = clips
        self.num_batches = -(-len(clips) // batch_size)

    def __call__(self, info):
        if info.iteration >= self.num_batches:
            raise StopIteration
        clip, t = divmod(info.idx_in_epoch, self.clip_len)
        clip = min(clip, len(self.clips) - 1)
        return self.frame(self._clip(clip, lambda: self.clips[clip]), t)


def build_pipeline(source, *, batch_size: int, height: int, width: int, device: torch.device, workers: int,
                   half: bool, start_method: str | None = None, hw_decoder_load: float | None = None):
    """A DALI pipeline over `source` (a TrainSource or EvalSource) of `batch_size` clips (batch_size·T frames)
    whose outputs are, per frame, (normalised (H, W, 3) in float16 if `half` else float32, label, camid,
    tracklet).

    On a GPU the frames are decoded by nvJPEG (`mixed`) with libjpeg's "fancy" chroma upsampling, as the CPU
    decoder, PIL and the original project decode them (DALI's default for `mixed` is the cheaper one, whose frames
    differ by a few levels at colour edges). `hw_decoder_load`: the share of the frames given to the GPU's hardware
    JPEG decoder where it has one (A100, H100; DALI's default 0.65), for the loader benchmark.

    The Python workers fork (fast) unless this process already holds a CUDA context, which a forked child must
    not inherit; then they are spawned (the source is pickled into them).
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    if start_method is None:
        start_method = "spawn" if torch.cuda.is_initialized() else "fork"

    @pipeline_def(enable_conditionals=True)
    def graph():
        encoded, *rest = fn.external_source(source=source, num_outputs=1 + len(source.names), batch=False,
                                            parallel=True, prefetch_queue_depth=2)
        extra = dict(zip(source.names, rest))
        # One decoder over the batch's B·T frames: nvJPEG (mixed) batches them all on a GPU.
        # (h, w, 3) uint8 RGB per frame, the project's one decoding rule; on a GPU with the CPU decoder's chroma
        # upsampling (see above)
        image = dali_decode(encoded, gpu, hw_decoder_load)
        if extra["needs_resize"]:  # per frame, from its JPEG header: resizing an H×W frame costs a lot on the CPU
            image = fn.resize(image, size=[height, width], interp_type=types.INTERP_LINEAR, antialias=True)
        if source.pad:  # H×W window at the clip's (top, left) anchor; outside the frame is black
            image = fn.slice(image, start=extra["crop"], shape=[height, width], axis_names="HW",
                             out_of_bounds_policy="pad", fill_values=0)
        if source.erase:  # zero-sized box = no erasing for this clip
            image = fn.erase(image, anchor=extra["erase_anchor"], shape=extra["erase_shape"], axis_names="HW",
                             fill_value=list(MEAN_PIXEL))
        # DALI has no bfloat16 output: for bf16 it writes float32 and the loader casts once on the device, so the
        # pixels are rounded once, as the torch backend rounds them (float16 out of DALI and then bf16 would round
        # twice; the float32 buffer costs ~0.1 ms of GPU bandwidth per batch).
        image = fn.crop_mirror_normalize(image, mirror=extra["flip"], dtype=types.FLOAT16 if half else types.FLOAT,
                                         mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
                                         output_layout="HWC")  # (H, W, 3)
        return image, extra["label"], extra["camid"], extra["tracklet"]

    device_id = None
    if gpu:  # without touching CUDA before the workers start
        device_id = device.index if device.index is not None else \
            (torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    pipe = graph(batch_size=batch_size * source.clip_len, num_threads=max(1, workers), device_id=device_id,
                 py_num_workers=max(1, workers), py_start_method=start_method, prefetch_queue_depth=2)
    with start_workers(spawn=start_method == "spawn"):  # they die with the trainer; its stop signals pass them by
        pipe.start_py_workers()  # before anything below can create a CUDA context
    pipe.build()
    return pipe


def _to_torch(tl, device: torch.device, zero_copy: bool) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) as a torch tensor on `device`.

    With DALI's dynamic executor (the default) a pipeline's outputs are never recycled while referenced, so
    DLPack hands them over without a copy (as DALI's own PyTorch iterator does; on a GPU, `torch.from_dlpack`
    passes torch's current stream, which DALI makes wait for its own); otherwise they are copied.
    """
    from nvidia.dali.plugin.pytorch import to_torch_type
    from nvidia.dali.tensors import TensorListGPU

    tensor = tl.as_tensor()
    gpu = isinstance(tl, TensorListGPU)
    here = device if gpu else torch.device("cpu")
    if zero_copy:
        with here:
            out = torch.from_dlpack(tensor)
    else:
        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=here)
        if gpu:
            stream = torch.cuda.current_stream(device)
            tensor.copy_to_external(ctypes.c_void_p(out.data_ptr()), stream.cuda_stream, non_blocking=True)
        else:
            tensor.copy_to_external(ctypes.c_void_p(out.data_ptr()))
    return out if gpu or device.type == "cpu" else out.to(device, non_blocking=True)


def shard_error(exc: BaseException, table) -> ShardChangedError | None:
    """The ShardChangedError behind a failed `pipe.run()`, or None.

    DALI hands a worker's exception over as text only (type lost, buried in a traceback), so: the line of the
    exception chain that starts with one of our shard paths (every ShardChangedError message does), else a shard
    that this process sees changed (e.g. bytes a decoder choked on).
    """
    seen = exc
    while seen is not None:
        for line in str(seen).splitlines():
            for path in table.shard_paths:
                if f"{path}: " in line:
                    return ShardChangedError(line[line.index(path):].strip())
        seen = seen.__cause__ or seen.__context__
    try:
        table.check_shards()
    except ShardChangedError as e:
        return e
    return None


def run_pipeline(pipe, source, device: torch.device, dtype: torch.dtype):
    """Yield dicts of torch tensors until the pipeline's source ends its epoch; then reset the pipeline.

    clips: (B, T, 3, H, W) in `dtype` on `device`, channels_last memory; labels, camids, tracklet: (B,) int64 on
    the CPU. A worker that found a shard changed under the job ends in a ShardChangedError naming the shard.
    """
    zero_copy, cpu, clip_len = bool(pipe.exec_dynamic), torch.device("cpu"), source.clip_len
    while True:
        try:
            frames, labels, camids, tracklets = pipe.run()
        except StopIteration:
            pipe.reset()
            return
        except Exception as e:  # noqa: BLE001 - DALI raises plain Exception/RuntimeError for a worker's failure
            error = shard_error(e, source.table)
            if error is None:
                raise
            raise error from None
        frames = _to_torch(frames, device, zero_copy)  # (B·T, H, W, 3)
        if frames.dtype != dtype:  # bf16 (see build_pipeline): one cast, on the device
            frames = frames.to(dtype)

        def first_frames(tl):  # per-frame metadata -> per clip (B,), copied out of DALI's buffer
            return _to_torch(tl, cpu, zero_copy)[::clip_len].clone()

        yield {"clips": as_clips(frames.view(-1, clip_len, *frames.shape[1:])), "labels": first_frames(labels),
               "camids": first_frames(camids), "tracklet": first_frames(tracklets)}


def close_pipeline(pipe) -> None:
    """Stop a pipeline's threads and Python workers now rather than at garbage collection."""
    if pipe is None:
        return
    shutdown = getattr(pipe, "_shutdown", None)  # DALI's own exit hook; the workers go with the pipeline
    if shutdown is not None:
        shutdown()
    del pipe
    gc.collect()

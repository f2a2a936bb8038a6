"""The DALI pipeline: parallel external_source reads the encoded frames of each clip, DALI decodes them
(`mixed` on a GPU, `cpu` without one), resizes frames that are not H×W, stacks the T frames into one FHWC clip
and applies the clip's augmentation to all its frames at once, then normalises to FCHW.

The callbacks are stateless: each sample is recomputed from its `SampleInfo` through the picklable plan (all
randomness comes from the plan, never from DALI's random operators), so a pipeline can start at any step.
Augmentation parameters reach DALI as per-sample inputs (flip flag, crop anchor, erase box).
"""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import torch

from stenvan.data.clips import IMAGENET_MEAN, IMAGENET_STD, MEAN_PIXEL, jpeg_size


def extra_outputs(pad: bool, erase: bool) -> tuple[str, ...]:
    """Names of the source's outputs after the T encoded frames (only those the pipeline uses)."""
    return ("needs_resize", "flip", *(("crop",) if pad else ()),
            *(("erase_anchor", "erase_shape") if erase else ()), "label", "camid", "tracklet")


class _SourceBase:
    """Common part of the callbacks: a ClipSpec -> the tuple of arrays the pipeline consumes."""

    def __init__(self, table, height: int, width: int, label_of: np.ndarray, pad: bool, erase: bool):
        self.table, self.store = table, table.store()
        self.height, self.width = height, width
        self.label_of = label_of  # per tracklet: train label, or pid for eval
        self.pad, self.erase = pad, erase
        self.names = extra_outputs(pad, erase)

    def outputs(self, spec) -> tuple:
        frames = [self.store.read(*loc) for loc in self.table.frame_locations(spec.tracklet, spec.frames)]
        needs_resize = any(jpeg_size(f) != (self.height, self.width) for f in frames)
        top, left, h, w = spec.erase
        return (*frames,
                np.array(needs_resize),
                np.array(spec.flip, dtype=np.int32),
                *((np.array(spec.crop, dtype=np.int32),) if self.pad else ()),
                *((np.array((top, left), dtype=np.float32), np.array((h, w), dtype=np.float32)) if self.erase
                  else ()),
                np.array(self.label_of[spec.tracklet], dtype=np.int64),
                np.array(self.table.camids[spec.tracklet], dtype=np.int64),
                np.array(spec.tracklet, dtype=np.int64))


class TrainSource(_SourceBase):
    """Epoch k of the pipeline is epoch `first_epoch + k`; its first one starts at `first_step`."""

    def __init__(self, table, plan, height: int, width: int, first_epoch: int, first_step: int):
        super().__init__(table, height, width, table.labels, pad=plan.aug.pad > 0, erase=plan.aug.erase_p > 0)
        self.plan, self.first_epoch, self.first_step = plan, first_epoch, first_step

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        step = info.iteration + (self.first_step if info.epoch_idx == 0 else 0)
        if step >= self.plan.steps_per_epoch:
            raise StopIteration
        return self.outputs(self.plan.sample(epoch, step, info.idx_in_batch))


class EvalSource(_SourceBase):
    """The clip list, padded with copies of its last clip to whole batches (the loader drops the copies)."""

    def __init__(self, table, clips: list, height: int, width: int, batch_size: int):
        super().__init__(table, height, width, table.pids, pad=False, erase=False)
        self.clips = clips
        self.num_batches = -(-len(clips) // batch_size)
        self.batch_size = batch_size

    def __call__(self, info):
        if info.iteration >= self.num_batches:
            raise StopIteration
        return self.outputs(self.clips[min(info.idx_in_epoch, len(self.clips) - 1)])


def build_pipeline(source, *, batch_size: int, clip_len: int, height: int, width: int, device: torch.device,
                   workers: int, half: bool, start_method: str | None = None):
    """A DALI pipeline over `source` (a TrainSource or EvalSource) whose outputs are
    (clips (T, 3, H, W) normalised, labels, camids, tracklets).

    The Python workers fork (fast) unless this process already holds a CUDA context, which a forked child must
    not inherit; then they are spawned (the source is pickled into them).
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    if start_method is None:
        start_method = "spawn" if torch.cuda.is_initialized() else "fork"

    @pipeline_def(enable_conditionals=True)
    def graph():
        outs = fn.external_source(source=source, num_outputs=clip_len + len(source.names), batch=False,
                                  parallel=True, prefetch_queue_depth=2)
        encoded, extra = outs[:clip_len], dict(zip(source.names, outs[clip_len:]))
        frames = [fn.decoders.image(f, device="mixed" if gpu else "cpu", output_type=types.RGB) for f in encoded]
        if extra["needs_resize"]:  # per clip, from the JPEG headers: resizing an H×W frame costs a lot on the CPU
            clip = fn.stack(*[fn.resize(f, size=[height, width], interp_type=types.INTERP_LINEAR, antialias=True)
                              for f in frames], axis_name="F")  # (T, H, W, 3)
        else:
            clip = fn.stack(*frames, axis_name="F")  # (T, H, W, 3)
        if source.pad:  # H×W window at the (top, left) anchor; outside the frame is black
            clip = fn.slice(clip, start=extra["crop"], shape=[height, width], axis_names="HW",
                            out_of_bounds_policy="pad", fill_values=0)
        if source.erase:  # zero-sized box = no erasing for this clip
            clip = fn.erase(clip, anchor=extra["erase_anchor"], shape=extra["erase_shape"], axis_names="HW",
                            fill_value=list(MEAN_PIXEL))
        clip = fn.crop_mirror_normalize(clip, mirror=extra["flip"], dtype=types.FLOAT16 if half else types.FLOAT,
                                        mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
                                        output_layout="FCHW")  # (T, 3, H, W)
        return clip, extra["label"], extra["camid"], extra["tracklet"]

    device_id = None
    if gpu:  # without touching CUDA before the workers start
        device_id = device.index if device.index is not None else \
            (torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    pipe = graph(batch_size=batch_size, num_threads=max(1, workers), device_id=device_id,
                 py_num_workers=max(1, workers), py_start_method=start_method, prefetch_queue_depth=2)
    pipe.start_py_workers()  # before anything below can create a CUDA context
    pipe.build()
    return pipe


def _to_torch(tl, device: torch.device, zero_copy: bool) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) as a torch tensor on `device`.

    With DALI's dynamic executor (the default) a pipeline's outputs are never recycled while referenced, so
    DLPack hands them over without a copy (as DALI's own PyTorch iterator does); otherwise they are copied.
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


def run_pipeline(pipe, device: torch.device, dtype: torch.dtype):
    """Yield dicts of torch tensors until the pipeline's source ends its epoch; then reset the pipeline.

    The clips land on `device` in `dtype`; labels, camids and tracklet indices stay on the CPU.
    """
    zero_copy, cpu = bool(pipe.exec_dynamic), torch.device("cpu")
    while True:
        try:
            clips, labels, camids, tracklets = pipe.run()
        except StopIteration:
            pipe.reset()
            return
        clips = _to_torch(clips, device, zero_copy)
        yield {"clips": clips if clips.dtype == dtype else clips.to(dtype),
               "labels": _to_torch(labels, cpu, zero_copy), "camids": _to_torch(camids, cpu, zero_copy),
               "tracklet": _to_torch(tracklets, cpu, zero_copy)}


def close_pipeline(pipe) -> None:
    """Stop a pipeline's threads and Python workers now rather than at garbage collection."""
    if pipe is None:
        return
    shutdown = getattr(pipe, "_shutdown", None)  # DALI's own exit hook; the workers go with the pipeline
    if shutdown is not None:
        shutdown()
    del pipe
    gc.collect()

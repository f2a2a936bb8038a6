"""Distributed setup from torchrun's environment; one code path for CPU, one GPU and N GPUs on M nodes.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python train.py` is a world of one. NCCL drives GPUs
and gloo the CPU. Every side effect (logging, checkpoints, files) is guarded by `World.is_main`.
Setup has three steps so that DALI's worker processes can fork before CUDA is initialised: `describe` only
reads the environment; `rendezvous` connects to the run's key-value store (how rank 0 tells the others which
checkpoint to resume from, before the loader forks); `join` selects the GPU and builds the process group on
that same store.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


TIMEOUT = datetime.timedelta(minutes=30)  # collectives and store reads (rank 0 may be reading a large checkpoint)


class DeviceError(RuntimeError):
    """The requested device does not exist here; the message says what to use instead."""


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def describe(device: str = "auto") -> World:
    """This process's place in the run and its device, from the environment; touches neither CUDA nor NCCL."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device={device!r}: valid values are auto, cpu, cuda")
    # torch.cuda.device_count() asks NVML, not the CUDA runtime, so it does not initialise CUDA.
    has_gpu = torch.cuda.device_count() > 0
    if device == "cuda" and not has_gpu:
        raise DeviceError("device=cuda but torch sees no CUDA GPU here; use --device cpu (or auto)")
    use_cuda = has_gpu if device == "auto" else device == "cuda"
    return World(rank, local_rank, size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def use_sync_bn(setting: str, world: World) -> bool:
    """Whether to convert BatchNorm to our SyncBatchNorm (stenvan.models.sync_batchnorm: statistics of the global
    batch, as one process holding it would compute them; no host sync; NCCL or gloo). 'auto' = with more than one
    GPU process (gloo runs on the CPU keep per-rank statistics unless 'true'); never for one process (nothing to
    synchronise: its BatchNorm already sees the whole batch)."""
    if world.size == 1:
        return False
    if setting == "auto":
        return world.device.type == "cuda"
    return setting == "true"


def rendezvous(world: World, prefix: str = "") -> dist.Store | None:
    """The run's key-value store (None for a world of one), before any process group or CUDA context exists.

    The same TCPStore that `init_process_group("env://")` would use: torchrun's agent hosts it at
    MASTER_ADDR:MASTER_PORT (fresh for every restart of the workers), or rank 0 does without an agent. Making it
    opens a TCP connection and nothing else: no CUDA call, no NCCL or gloo communicator, so DALI's workers can
    still fork afterwards. `join` builds the process group on this store.
    `prefix` keeps one run's keys (ours and its process group's) apart from another's in the same processes: the
    10-split runner (stenvan.training.splits) trains one run per person split, one after the other, on one store.
    """
    if world.size == 1:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=world.rank, world_size=world.size, timeout=TIMEOUT))
    store.set_timeout(TIMEOUT)
    return dist.PrefixStore(prefix, store) if prefix else store


def join(world: World, store: dist.Store | None = None) -> None:
    """Select this process's GPU and join the process group torchrun describes (if there is one)."""
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    if world.size > 1 and not dist.is_initialized():
        # The prefix keeps the group's keys apart from ours, as init_process_group does with its own store.
        kwargs = {} if store is None else {"store": dist.PrefixStore("default_pg", store), "rank": world.rank,
                                           "world_size": world.size}
        dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=world.device if world.device.type == "cuda" else None, **kwargs)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def host_group(world: World):
    """The process group for agreeing on the host (`first_failure`): gloo, so that the GPU never waits for it.
    The default group where it is gloo already (CPU runs), a gloo group beside NCCL on GPUs; None alone."""
    if world.size == 1:
        return None
    return dist.new_group(backend="gloo") if world.device.type == "cuda" else dist.group.WORLD


def first_failure(line: str | None, rank: int, world_size: int, store: dist.Store, group) -> tuple[int, str] | None:
    """Every rank calls this at the same point: (the lowest rank that failed, its `line`), or None if no rank did.

    One all-reduce of one integer on the CPU (gloo: the GPU never waits for it, nor the step's collectives for
    it); the failing rank's line travels through the run's store. A rank that stops alone would leave the others
    waiting in the step's collectives until the 30-minute timeout; agreeing here first, every rank stops together.
    """
    if line is not None:
        store.set(f"stenvan/failure/rank{rank}", line)
    first = torch.tensor([rank if line is not None else world_size], dtype=torch.int64)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    failed = int(first.numpy()[0])  # host memory: no device sync (and no scalar read for the step-sync test)
    if failed == world_size:
        return None
    return failed, store.get(f"stenvan/failure/rank{failed}").decode()


class _GatherWithGrad(torch.autograd.Function):
    """Forward: every rank's (B, ...) tensor concatenated in rank order, (W·B, ...). Backward: every rank's
    gradient of the concatenation is summed (each rank's loss used all of it) and this rank keeps its rows.

    An all-reduce rather than a reduce-scatter, so that it runs on gloo as well as NCCL; the tensors are
    features of one batch (32 × 2048 floats), so the extra traffic is nothing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd may still hold grad
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank in rank order; gradients flow back to each rank's own part."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if not x.is_floating_point():  # labels: no gradient to carry
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(x.contiguous())


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

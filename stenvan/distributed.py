"""Distributed setup from torchrun's environment; one code path for CPU, one GPU and N GPUs on M nodes.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python train.py` is a world of one. NCCL drives GPUs
and gloo the CPU. Every side effect (logging, checkpoints, files) goes through `is_main()`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> World:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA GPU; use --device cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=dev if use_cuda else None)
    return World(rank, local_rank, size, dev)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank in rank order; gradients flow back to each rank's own part."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if not x.is_floating_point():  # labels: no gradient to carry
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest value over all ranks (e.g. 'some rank was told to stop')."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

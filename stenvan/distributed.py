"""Distributed setup from torchrun's environment; one code path for CPU, one GPU and N GPUs on M nodes.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python train.py` is a world of one. NCCL drives GPUs
and gloo the CPU. Every side effect (logging, checkpoints, files) is guarded by `World.is_main`.
Setup has two halves so that DALI's worker processes can fork before CUDA is initialised: `describe` only
reads the environment, `join` selects the GPU and joins the process group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def join(world: World) -> None:
    """Select this process's GPU and join the process group torchrun describes (if there is one)."""
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30),
                                device_id=world.device if world.device.type == "cuda" else None)


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


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

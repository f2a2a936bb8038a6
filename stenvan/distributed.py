"""Distributed setup from torchrun's environment; one code path for CPU, one GPU and N GPUs on M nodes.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python train.py` is a world of one. NCCL drives GPUs
and gloo the CPU. Every side effect (logging, checkpoints, files) is guarded by `World.is_main`.
Setup has three steps so that DALI's worker processes can fork before CUDA is initialised: `describe` only
reads the environment; `rendezvous` connects to the run's key-value store (how rank 0 tells the others which
checkpoint to resume from, before the loader forks); `join` selects the GPU and builds the process group on
that same store.

Restarts (`torchrun --max-restarts`): torch 2.x keeps one store for the whole job by default (the agent's; with
the static and the c10d rendezvous alike), so a restarted attempt finds the previous attempt's keys in it: its
ranks would read the old resume decision and the process group's stale bootstrap addresses. Each attempt
therefore keeps its keys under its own prefix (`TORCHELASTIC_RESTART_COUNT`). That count is the attempt's on every
rank only with one agent (one node); across nodes each agent counts its own restarts, so a multi-node job that
may restart needs a fresh store per attempt (`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` with `--rdzv-backend=c10d`),
and one that would share the store is refused at start, in one line (`check_restartable`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


TIMEOUT = datetime.timedelta(minutes=30)  # collectives and store reads (rank 0 may be reading a large checkpoint)


class DeviceError(RuntimeError):
    """The requested device does not exist here; the message says what to use instead."""


class LaunchError(RuntimeError):
    """torchrun was asked for something this run cannot do safely; the message says what to set instead."""


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
    if use_cuda and local_rank >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceError(f"LOCAL_RANK={local_rank} but {count} GPU(s) are visible here: start at most {count} "
                          f"process(es) per node (torchrun --nproc_per_node={count}), or make more GPUs visible "
                          "(CUDA_VISIBLE_DEVICES)")
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


def check_restartable(env: Mapping[str, str]) -> None:
    """Raise LaunchError (one line) where torchrun may restart the workers of several nodes on the store of the
    previous attempt (see the module docstring): their attempts could not tell their keys apart."""
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent's store outlives each attempt
    nodes, restarts = int(env.get("GROUP_WORLD_SIZE", 1)), int(env.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if shared and nodes > 1 and restarts > 0:
        raise LaunchError(f"torchrun --max-restarts={restarts} with {nodes} nodes shares one store between the "
                          "attempts, which a restart of several nodes cannot use: set "
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv-backend=c10d on every node (each attempt "
                          "then gets a fresh store), or --max-restarts=0")


def attempt_prefix(env: Mapping[str, str]) -> str | None:
    """The key prefix of this attempt in a store that outlives attempts (torchrun's agent store), else None."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # rank 0 hosts a fresh store for each attempt (or there is no agent)
    return f"stenvan/attempt{int(env.get('TORCHELASTIC_RESTART_COUNT', 0))}"


def store_prefix(env: Mapping[str, str], prefix: str = "") -> str:
    """The prefix of a run's keys in the store: this attempt's (`attempt_prefix`), then the run's own `prefix` (a
    person split's, see `rendezvous`); "" for neither."""
    return "/".join(part for part in (attempt_prefix(env), prefix) if part)


def rendezvous(world: World, prefix: str = "") -> dist.Store | None:
    """The run's key-value store for this attempt (None for a world of one), before any process group or CUDA
    context exists.

    The TCPStore that `init_process_group("env://")` would use, at MASTER_ADDR:MASTER_PORT: torchrun's agent hosts
    it (by default one for the whole job: this attempt's keys then go under `attempt_prefix`), or rank 0 does (a
    fresh one per attempt: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or no agent). Making it opens a TCP connection and
    nothing else: no CUDA call, no NCCL or gloo communicator, so DALI's workers can still fork afterwards. `join`
    builds the process group on this store.
    `prefix` keeps one run's keys (ours and its process group's) apart from another's in the same processes: the
    10-split runner (stenvan.training.splits) trains one run per person split, one after the other, on one store
    (rank 0's store is reused, not made again: multi-tenant). It goes under the attempt's prefix, so that a
    restarted attempt of a `--split all` run starts each split on keys of its own.
    """
    if world.size == 1:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=world.rank, world_size=world.size, timeout=TIMEOUT))
    store.set_timeout(TIMEOUT)
    keys = store_prefix(os.environ, prefix)
    return dist.PrefixStore(keys, store) if keys else store


def gloo_interface(nccl_ifname: str, interfaces: list[str]) -> str | None:
    """The network interface gloo should use for NCCL's NCCL_SOCKET_IFNAME (`eth`: the first interface whose name
    starts with it; `=eth0`: exactly that one; a comma-separated list: the first that matches), or None (no match,
    or a `^` exclusion list, which gloo has no form for)."""
    if not nccl_ifname or nccl_ifname.startswith("^"):
        return None
    exact = nccl_ifname.startswith("=")
    wanted = [w.strip() for w in nccl_ifname.lstrip("=").split(",") if w.strip()]
    for name in wanted:
        for interface in interfaces:
            if interface == name or (not exact and interface.startswith(name)):
                return interface
    return None


def set_gloo_interface(env: MutableMapping[str, str]) -> str | None:
    """Across nodes gloo binds to the address the host name resolves to (often 127.0.1.1, unreachable from the
    other nodes), so its groups can fail where NCCL, told where to go by NCCL_SOCKET_IFNAME, works. Unless
    GLOO_SOCKET_IFNAME is set, set it to NCCL_SOCKET_IFNAME's interface; returns what was set (or None)."""
    if env.get("GLOO_SOCKET_IFNAME") or not env.get("NCCL_SOCKET_IFNAME"):
        return None
    import socket

    interface = gloo_interface(env["NCCL_SOCKET_IFNAME"], [name for _, name in socket.if_nameindex()])
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface
    return interface


def join(world: World, store: dist.Store | None = None) -> None:
    """Select this process's GPU and join the process group torchrun describes (if there is one)."""
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    if world.size > 1:
        set_gloo_interface(os.environ)  # before any gloo group: the default one on CPUs, `host_group`'s on GPUs
    if world.size > 1 and not dist.is_initialized():
        # The prefix keeps the group's keys apart from ours, as init_process_group does with its own store.
        kwargs = {} if store is None else {"store": dist.PrefixStore("default_pg", store), "rank": world.rank,
                                           "world_size": world.size}
        dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=world.device if world.device.type == "cuda" else None, **kwargs)


def data_parallel(model: torch.nn.Module, world: World, buffers_in_sync: bool) -> torch.nn.Module:
    """`model` under DistributedDataParallel (itself in a world of one). DDP broadcasts rank 0's buffers before
    every forward by default, which keeps per-rank BatchNorm statistics alike; with `buffers_in_sync` (synchronised
    BatchNorm computes the same statistics on every rank; frozen BatchNorm never changes them) that is a collective
    per step for nothing, so it is left out."""
    if world.size == 1:
        return model
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.14 renamed the option (the old name warns); torch 2.11 knows only the old one.
    option = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
        "broadcast_buffers"
    return ddp(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
               **{option: not buffers_in_sync})


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def host_group(world: World):
    """The process group for agreeing on the host (`agree_on_host`): gloo, so that the GPU never waits for it.
    The default group where it is gloo already (CPU runs), a gloo group beside NCCL on GPUs; None alone."""
    if world.size == 1:
        return None
    return dist.new_group(backend="gloo") if world.device.type == "cuda" else dist.group.WORLD


def agree_on_host(line: str | None, stop_signal: int, rank: int, world_size: int, store: dist.Store,
                  group) -> tuple[tuple[int, str] | None, int]:
    """Every rank calls this at the same point: ((the lowest rank that failed, its `line`) or None if no rank did,
    the highest stop signal any rank received, 0 if none).

    One all-reduce of two integers on the CPU (gloo: the GPU never waits for it, nor the step's collectives for
    it); the failing rank's line travels through the run's store. A rank that stops alone would leave the others
    waiting in the step's collectives until the 30-minute timeout; agreeing here first, every rank stops together,
    at the same step.
    """
    if line is not None:
        store.set(f"stenvan/failure/rank{rank}", line)
    # MIN of [failed rank or W, -signal]: the lowest failed rank and the highest signal in one reduction.
    agreed = torch.tensor([rank if line is not None else world_size, -stop_signal], dtype=torch.int64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    failed, stop = (int(v) for v in agreed.numpy())  # host memory: no device sync (nor a scalar read)
    if failed == world_size:
        return None, -stop
    return (failed, store.get(f"stenvan/failure/rank{failed}").decode()), -stop


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

"""What each gloo process runs in tests/test_sync_batchnorm.py (spawned: a light module, no fixtures).

`launch(fn, world, out_dir)` starts `world` processes on a free port; each joins a gloo group through env://,
runs `fn(rank, world)` and saves what it returns to out_dir/rank<r>.pt for the parent to check.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from stenvan.models.sync_batchnorm import convert_sync_batchnorm

BATCH = 8  # rows of the global batch: divisible by 2 and 4, and W/BATCH is a power of 2 (exact in bf16)
CHANNELS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(fn, world: int, out_dir: Path) -> list:
    """Run fn(rank, world) in `world` spawned gloo processes; their results in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(fn, world, free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------------------------------------
# One layer, its share of a batch: what the parent compares with BatchNorm on the whole batch
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    spatial: tuple  # () = BatchNorm1d on (N, C); (H, W) = BatchNorm2d
    channels_last: bool = False
    bf16: bool = False  # under CPU bf16 autocast, the layer sees bf16 input (as a conv's output there)
    frozen_bias: bool = False  # the head's BNNeck


CASES = [Case("1d", ()), Case("1d frozen bias", (), frozen_bias=True), Case("2d", (5, 3)),
         Case("2d channels_last", (5, 3), channels_last=True), Case("1d bf16", (), bf16=True, frozen_bias=True),
         Case("2d channels_last bf16", (5, 3), channels_last=True, bf16=True)]
STEPS = 2  # two training steps: the running statistics are updated twice (momentum applied to non-trivial ones)


def make_layer(case: Case) -> torch.nn.Module:
    """A BatchNorm with non-trivial weight, bias and running statistics (the same on every rank)."""
    gen = torch.Generator().manual_seed(1)
    layer = (torch.nn.BatchNorm2d if case.spatial else torch.nn.BatchNorm1d)(CHANNELS)
    with torch.no_grad():
        layer.weight.copy_(1 + torch.randn(CHANNELS, generator=gen))
        layer.bias.copy_(torch.randn(CHANNELS, generator=gen))
        layer.running_mean.copy_(torch.randn(CHANNELS, generator=gen))
        layer.running_var.copy_(1 + torch.rand(CHANNELS, generator=gen))
    layer.bias.requires_grad_(not case.frozen_bias)
    return layer


def make_batch(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (BATCH, C, *spatial) and the loss weights g; values exact in bf16 for the bf16 cases.
    Channel means of 5-20 times the spread: a naive E[x²] − E[x]² would lose digits."""
    gen = torch.Generator().manual_seed(100 + step)
    shape = (BATCH, CHANNELS, *case.spatial)
    offset = torch.linspace(-20, 20, CHANNELS).view(1, CHANNELS, *([1] * len(case.spatial)))
    x = 4 + offset + torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    if case.bf16:
        x, g = x.bfloat16().float(), g.bfloat16().float()
    return x, g


def share(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's rows r, r + W, ... of the global batch: the sampler's cross-section."""
    return t[rank::world]


def layer_share(rank: int, world: int, device: str = "cpu") -> dict:
    """Every case: our SyncBatchNorm under DDP on this rank's share; per step the output, the input gradient and
    DDP's averaged weight/bias gradients, then the running statistics and the eval-mode output on the batch (all
    on the CPU). On "cuda" every rank uses the one GPU there is, over gloo: the fused kernels' path."""
    dev = torch.device(device)
    results = {}
    for case in CASES:
        layer = make_layer(case)
        model = convert_sync_batchnorm(torch.nn.Sequential(layer)).to(dev)
        bn = model[0]
        ddp = DistributedDataParallel(model, device_ids=[0] if dev.type == "cuda" else None)
        steps = []
        for step in range(STEPS):
            x, g = make_batch(case, step)
            inp = share(x, rank, world).to(dev)
            if case.channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            inp = inp.to(torch.bfloat16 if case.bf16 else torch.float32).requires_grad_()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=case.bf16):
                y = ddp(inp)
            # DDP's convention: each rank's loss is the mean over its rows, so the ranks' losses sum to W times
            # the one-process loss (the mean over the batch) and DDP's averaged gradients equal its gradients.
            loss = (y.float() * share(g, rank, world).to(dev)).sum() * world / BATCH
            loss.backward()
            steps.append({"y": y.detach().cpu(), "x_grad": inp.grad.cpu(), "channels_last": (
                          y.is_contiguous(memory_format=torch.channels_last),
                          inp.grad.is_contiguous(memory_format=torch.channels_last)) if case.spatial else None,
                          "weight_grad": bn.weight.grad.cpu().clone(),
                          "bias_grad": None if bn.bias.grad is None else bn.bias.grad.cpu().clone()})
            ddp.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            eval_out = model(make_batch(case, STEPS)[0].to(dev))  # plain BatchNorm with the running statistics
        results[case.name] = {"steps": steps, "eval": eval_out.cpu(), "type": type(bn).__name__,
                              "bias_requires_grad": bn.bias.requires_grad,
                              **{k: v.cpu().clone() for k, v in bn.state_dict().items()}}
    return results


# ----------------------------------------------------------------------------------------------------------
# Host syncs through a converted model's training step
# ----------------------------------------------------------------------------------------------------------

# Ops whose output shape depends on tensor values: on a GPU each one waits for the device (torch's SyncBatchNorm
# drops empty ranks with `count_all[mask]`, which is nonzero() inside), though on the CPU none of them dispatches
# `_local_scalar_dense`.
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                  "unique_dim", "repeat_interleave", "nonzero_static"}


class HostReads(TorchDispatchMode):
    """Counts what would make the host wait for the device: scalar reads (`.item()`, `float(t)`, `bool(t)`: all
    `aten._local_scalar_dense`), data-dependent shapes (boolean-mask indexing and the ops above), and, by
    wrapping `Tensor.tolist` (on the CPU it reads memory without dispatching), `.tolist()`."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func is torch.ops.aten._local_scalar_dense.default or name in DATA_DEPENDENT or (
                name in ("index", "index_put_", "index_put") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _indices(args))):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        real = self._real_tolist = torch.Tensor.tolist
        seen = self.seen

        def tolist(t):
            seen.append("tolist")
            return real(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._real_tolist
        return super().__exit__(*exc)


def _indices(args) -> list:
    return [i for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []) if i is not None]


def model_step_reads(rank: int, world: int) -> dict:
    """A tiny STE-NVAN converted to SyncBatchNorm under DDP, the re-id loss over the global batch: the host reads
    of each of three forward+backward passes (the first two also build DDP's buckets)."""
    from stenvan.training.losses import ReIDLoss
    from stenvan.models import build_model
    from stenvan.models.sync_batchnorm import SyncBatchNorm

    torch.manual_seed(0)
    model = convert_sync_batchnorm(build_model("ste_nvan", 4, stripes=2)).to(memory_format=torch.channels_last)
    converted = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
    ddp = DistributedDataParallel(model)
    criterion = ReIDLoss()
    gen = torch.Generator().manual_seed(rank)
    reads = []
    for _ in range(3):
        clips = torch.randn(2, 4, 3, 32, 16, generator=gen)  # (B, T, 3, H, W): this rank's 2 clips
        labels = torch.tensor([0, 1])  # 2 identities, W clips of each in the global batch
        with HostReads() as counter:
            feats, logits = ddp(clips)
            criterion(feats, logits, labels)["loss"].backward()
        reads.append(counter.seen)
        ddp.zero_grad(set_to_none=True)
    return {"reads": reads, "converted": converted,
            "stats_moved": float(model.head.bn.running_var.sub(1).abs().max())}


# ----------------------------------------------------------------------------------------------------------
# torch.compile of DDP with our SyncBatchNorm against eager
# ----------------------------------------------------------------------------------------------------------

class SmallNet(torch.nn.Module):
    """conv → BN → ReLU → conv → BN (2d) → pool → BN (1d): both kinds of layer, the same weights on every
    rank."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8)
        self.head = torch.nn.BatchNorm1d(8)

    def forward(self, x):  # (N, 3, 6, 6) -> (N, 8)
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


def compiled_vs_eager(rank: int, world: int, device: str = "cpu", backend: str = "aot_eager") -> dict:
    """The same SyncBatchNorm net under DDP, trained eagerly and under torch.compile(`backend`) for 3 steps of
    this rank's share: per step the outputs and the first conv's weight gradient, then the BatchNorm buffers; and
    what dynamo captured into graphs of the net (each SyncBatchNorm layer must run outside them).
    `aot_eager` on the CPU: dynamo's graph capture and AOTAutograd's functionalization (where an undeclared
    in-place update of the running statistics would be lost), without Inductor's minutes of C++ compilation."""
    import copy

    import torch._dynamo

    dev = torch.device(device)
    net = convert_sync_batchnorm(SmallNet()).to(dev)
    models = {"eager": net, "compiled": copy.deepcopy(net)}
    ids = [dev.index or 0] if dev.type == "cuda" else None
    forwards = {"eager": DistributedDataParallel(models["eager"], device_ids=ids)}
    forwards["compiled"] = torch.compile(DistributedDataParallel(models["compiled"], device_ids=ids), backend=backend)
    out = {kind: {"steps": []} for kind in models}
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        batch = torch.randn(2 * world, 3, 6, 6, generator=gen)
        x = share(batch, rank, world).to(dev)
        for kind, forward in forwards.items():
            y = forward(x)
            (y.square().sum() * (1 + step)).backward()
            conv = models[kind].conv1
            out[kind]["steps"].append({"y": y.detach().cpu(), "grad": conv.weight.grad.detach().cpu().clone()})
            conv.weight.grad = None
    for kind, model in models.items():
        out[kind]["buffers"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                                if "running" in k or "num_batches" in k}
    torch._dynamo.reset()
    captured = []  # what dynamo puts into graphs: the targets of their nodes

    def recording(gm, example_inputs):
        captured.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch.compile(copy.deepcopy(net), backend=recording)(share(batch, rank, world).to(dev)).sum().backward()
    out["captured"] = captured
    return out


# ----------------------------------------------------------------------------------------------------------
# The triplet loss's all-gather
# ----------------------------------------------------------------------------------------------------------

def triplet_features(world_batch: int = 8, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Global-batch features (N, D) and labels (N,): 4 identities, clusters a few units wide."""
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(world_batch) % 4
    feats = 3 * torch.randn(4, dim, generator=gen)[labels] + torch.randn(world_batch, dim, generator=gen)
    return feats, labels


def triplet_share(rank: int, world: int, device: str = "cpu") -> dict:
    """The re-id loss on this rank's rows (rank-ordered blocks of the global batch, as the sampler lays them out):
    the triplet loss over the gathered global batch and the gradient of it that reaches this rank's features."""
    from stenvan.training.losses import ReIDLoss

    feats, labels = triplet_features()
    rows = len(labels) // world
    mine = feats[rank * rows:(rank + 1) * rows].to(device).requires_grad_()
    logits = torch.zeros(rows, 4, device=device, requires_grad=True)
    losses = ReIDLoss(triplet_weight=1.0, ce_weight=0.0)(mine, logits, labels[rank * rows:(rank + 1) * rows].to(device))
    losses["loss"].backward()
    return {"triplet": losses["triplet"].cpu(), "grad": mine.grad.cpu()}


# ----------------------------------------------------------------------------------------------------------
# DDP's buffer broadcast
# ----------------------------------------------------------------------------------------------------------

def buffer_broadcasts(rank: int, world: int) -> dict:
    """Broadcasts per training step of a SyncBatchNorm net under the trainer's DDP wrapper (stenvan.distributed.
    data_parallel), with its buffers declared in sync (synchronised BatchNorm) or not (per-rank BatchNorm), counted
    by the profiler after DDP's first steps (which rebuild its buckets)."""
    from stenvan.distributed import World, data_parallel

    counts = {}
    for in_sync in (True, False):
        net = convert_sync_batchnorm(SmallNet()) if in_sync else SmallNet()
        forward = data_parallel(net, World(rank, rank, world, torch.device("cpu")), buffers_in_sync=in_sync)
        steps = [torch.randn(2, 3, 6, 6) for _ in range(5)]
        for x in steps[:3]:
            forward(x).sum().backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for x in steps[3:]:
                forward(x).sum().backward()
        counts[in_sync] = sum(e.name == "c10d::broadcast_" for e in prof.events()) / 2
    return counts

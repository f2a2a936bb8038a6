"""Several processes on the CPU (gloo): 4 processes launched as 2 simulated nodes of 2 (torchrun's c10d
rendezvous, like the README's multi-node command) equal 1 process after a step; so do 2 processes training
BatchNorm with `--sync_bn true`; the README's distributed presets split over 8 and 16 ranks; sync_bn's default;
the per-rank BatchNorm check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from stenvan.checkpoint import read_checkpoint
from stenvan.config import ConfigError, load_config
from stenvan.data.sampling import IdentitySampler
from stenvan.distributed import World, use_sync_bn
from stenvan.training.trainer import check_batchnorm_share
from tests.test_train import REPO, model_of, run, shards, train_cmd  # noqa: F401 - the module's shard fixture


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def update_and_difference(a: dict, b: dict, init: dict) -> tuple[float, float]:
    floats = [k for k in a if a[k].is_floating_point()]
    update = sum((a[k] - init[k]).double().norm() ** 2 for k in floats) ** 0.5
    differ = sum((a[k] - b[k]).double().norm() ** 2 for k in floats) ** 0.5
    return float(update), float(differ)


def test_four_processes_on_two_nodes_equal_one_process(shards, tmp_path):  # noqa: F811
    # The global batch of P·K = 4·2 = 8 clips: 2 per rank, one clip of 2 identities each. As in the 1-vs-2 test
    # of test_train: frozen BatchNorm (per-rank statistics would differ from the batch's) and SGD with a small lr.
    # Only float reduction order differs (measured ~7e-5 of the update); a missing rank's gradient or half of
    # the mining changes the update by tens of percent.
    common = ["--max_steps", "1", "--freeze_bn", "true", "--ids_per_batch", "4", "--optimizer", "sgd", "--lr", "1e-4",
              "--ckpt_minutes", "0"]
    one = run(train_cmd(shards, tmp_path / "one", *common))
    assert one.returncode == 0, one.stderr
    # Two torchrun agents on this machine stand for two nodes; the command is the README's multi-node one (a fresh
    # store for each attempt: what several nodes need to restart, see stenvan.distributed).
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=3",
            *train_cmd(shards, tmp_path / "four", *common, "--resume", "auto")[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agents = [subprocess.Popen(node, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n".join(err[-3000:] for _, err in outputs)
    four = read_checkpoint(tmp_path / "four" / "last.pt")
    assert four["world_size"] == 4 and four["progress"]["global_step"] == 1
    from stenvan.evaluation.evaluate import load_model_for_eval

    init = load_model_for_eval(str(tmp_path / "one" / "last.pt"), None, untrained=True)[0].state_dict()
    update, differ = update_and_difference(model_of(tmp_path / "one" / "last.pt"), four["model"], init)
    assert update > 1e-4  # training moved the weights
    assert differ < 1e-3 * update, f"1 vs 4 processes differ by {differ / update:.2e} of the update"
    # The all-gather of the triplet loss is our own autograd function, not torch's deprecated one.
    assert not any("is deprecated" in err for _, err in outputs)


def test_two_processes_with_sync_bn_equal_one_process(shards, tmp_path):  # noqa: F811
    # BatchNorm trains (not frozen): with --sync_bn true each of the 2 ranks normalises its 4 clips with the
    # statistics of all 8, so the loss, the step and the running statistics equal one process's on the whole batch
    # (where --sync_bn true changes nothing: there is nothing to sync). Measured, as a share of the update:
    #   running statistics: synchronised 3e-5, per-rank (--sync_bn false) 0.49;
    #   weights: synchronised 1.2e-2, per-rank 2.4. The synchronised 1.2e-2 is fp32 itself: this tiny untrained
    #   model's gradients through ~60 live BatchNorms over 8 clips are ill-conditioned (one process's fp32
    #   gradient differs from its fp64 gradient by 1.8e-2 in the early layers), so the bound is 5e-2;
    #   the first loss: synchronised 1.4e-5 (relative), per-rank 3.8e-2.
    common = ["--max_steps", "1", "--ids_per_batch", "4", "--optimizer", "sgd", "--lr", "1e-4", "--ckpt_minutes", "0",
              "--sync_bn", "true"]
    one = run(train_cmd(shards, tmp_path / "one", *common))
    assert one.returncode == 0, one.stderr
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
               *train_cmd(shards, tmp_path / "two", *common)[1:]])
    assert two.returncode == 0, two.stderr
    assert "BatchNorm synchronised over the global batch" in two.stdout + two.stderr
    state = read_checkpoint(tmp_path / "two" / "last.pt")
    assert state["world_size"] == 2 and state["progress"]["global_step"] == 1
    from stenvan.evaluation.evaluate import load_model_for_eval

    # The 2-process checkpoint loads strictly into the plain model, as eval.py and a one-process resume build it.
    trained = load_model_for_eval(str(tmp_path / "two" / "last.pt"), None)[0].state_dict()
    init = load_model_for_eval(str(tmp_path / "one" / "last.pt"), None, untrained=True)[0].state_dict()
    reference = model_of(tmp_path / "one" / "last.pt")
    assert trained.keys() == reference.keys() == state["model"].keys()
    for kind, bound in (("running", 1e-3), ("weights", 5e-2)):
        keys = [k for k in reference if ("running_" in k) == (kind == "running")]
        update, differ = update_and_difference(*({k: d[k] for k in keys} for d in (reference, state["model"], init)))
        assert update > 1e-3  # training moved them
        assert differ < bound * update, f"{kind}: 1 vs 2 processes differ by {differ / update:.2e} of the update"
    losses = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])["loss"] for d in ("one", "two")]
    assert abs(losses[0] - losses[1]) < 1e-4 * abs(losses[0]), losses


@pytest.mark.parametrize("preset", ["configs/ste_nvan_mars.yaml", "configs/nvan_mars.yaml"])
@pytest.mark.parametrize("world_size", [8, 16])
def test_readme_presets_split_over_8_and_16_ranks(preset, world_size):
    # The README's commands: one node of 8 GPUs (STE-NVAN) and two nodes of 8 (NVAN), P = 8 x K = 4.
    cfg = load_config(str(REPO / preset), data="shards/mars")
    labels = np.repeat(np.arange(625), 3)  # MARS: 625 train identities
    for rank in range(world_size):
        sampler = IdentitySampler(labels, cfg.ids_per_batch, cfg.tracklets_per_id, cfg.seed, rank, world_size)
        assert sampler.batch_size == 32 // world_size and sampler.ids_per_rank == min(8, 32 // world_size) >= 2
    gpus = World(0, 0, world_size, torch.device("cuda", 0))
    assert use_sync_bn(cfg.sync_bn, gpus)  # the default on GPUs: BatchNorm over the global batch
    assert check_batchnorm_share(sampler.ids_per_rank, sampler.batch_size, per_rank_bn=False) is None


def test_sync_bn_default_and_its_errors():
    cpu2, gpu8 = World(0, 0, 2, torch.device("cpu")), World(3, 3, 8, torch.device("cuda", 3))
    one = World(0, 0, 1, torch.device("cuda", 0))
    assert use_sync_bn("auto", gpu8) and not use_sync_bn("auto", cpu2) and not use_sync_bn("auto", one)
    assert not use_sync_bn("false", gpu8) and use_sync_bn("true", gpu8) and not use_sync_bn("true", one)
    assert use_sync_bn("true", cpu2)  # our SyncBatchNorm runs on gloo too (torch's ran on GPUs only)
    # YAML's booleans and the command line's words name the same settings.
    assert load_config(None, ["--sync_bn", "true"], data="x").sync_bn == "true"
    assert load_config(None, ["--sync_bn", "False"], data="x").sync_bn == "false"
    assert load_config(None, [], data="x").sync_bn == "auto"
    with pytest.raises(ConfigError, match="valid values are auto, true, false"):
        load_config(None, ["--sync_bn", "maybe"], data="x")


def test_per_rank_batchnorm_share_check():
    assert check_batchnorm_share(ids_per_rank=4, clips_per_rank=4, per_rank_bn=True) is None
    assert "1 identity" in check_batchnorm_share(ids_per_rank=1, clips_per_rank=4, per_rank_bn=True)
    assert check_batchnorm_share(ids_per_rank=1, clips_per_rank=1, per_rank_bn=False) is None  # synced or frozen
    with pytest.raises(ConfigError, match="1 clip"):
        check_batchnorm_share(ids_per_rank=1, clips_per_rank=1, per_rank_bn=True)


def test_triplet_all_gather_at_two_ranks_equals_one_process(tmp_path):
    """The triplet loss mines over the global batch gathered from the ranks (gloo here; on one GPU shared by two
    ranks in test_gpu_two_ranks.py): the same loss as one process on the whole batch, and each rank's features get
    W times their rows of its gradient (every rank's loss is the whole batch's; DDP averages over the W ranks)."""
    from stenvan.training.losses import batch_hard_triplet
    from tests.sync_bn_workers import launch, triplet_features, triplet_share

    feats, labels = triplet_features()
    whole = feats.clone().requires_grad_()
    truth = batch_hard_triplet(whole, labels)
    truth.backward()
    rows = len(labels) // 2
    for rank, result in enumerate(launch(triplet_share, 2, tmp_path)):
        torch.testing.assert_close(result["triplet"], truth.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(result["grad"], 2 * whole.grad[rank * rows:(rank + 1) * rows], rtol=1e-5, atol=1e-6)


def test_ddp_leaves_synchronised_buffers_alone(tmp_path):
    """With synchronised BatchNorm every rank computes the same running statistics: DDP's broadcast of rank 0's
    buffers before every forward is a collective per step for nothing, and the trainer's wrapper leaves it out;
    with per-rank BatchNorm it keeps it (the statistics then are rank 0's on every rank)."""
    from tests.sync_bn_workers import buffer_broadcasts, launch

    for counts in launch(buffer_broadcasts, 2, tmp_path):
        assert counts[True] == 0 and counts[False] >= 1, counts  # per step (per-rank: one per buffer dtype)

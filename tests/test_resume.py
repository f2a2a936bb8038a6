"""Resume is decided once, on rank 0: with the newest checkpoint damaged, 2 gloo processes resume from the
same earlier one; a rank that cannot read rank 0's choice (a run folder not shared across nodes) stops the run
with one clear line; a resumed run does not fetch the ImageNet weights again (offline resume)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from stenvan.checkpoint import read_checkpoint
from stenvan.config import load_config
from tests.test_distributed import free_port
from tests.test_train import REPO, TINY, run, shards, train_cmd  # noqa: F401 - the module's shard fixture


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
            str(free_port()), *args]


@pytest.fixture(scope="module")
def two_rank_run(shards, module_tmp):  # noqa: F811
    """A 2-process run of 2 steps with a checkpoint after each."""
    out = module_tmp("resume") / "run"
    result = run(torchrun(*train_cmd(shards, out, "--max_steps", "2", "--ckpt_every", "1", "--keep_ckpts", "5")[1:]))
    assert result.returncode == 0, result.stderr
    return out


def test_two_ranks_resume_from_one_checkpoint_when_the_newest_is_damaged(shards, two_rank_run, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(two_rank_run, out)
    newest = out / "step-000000002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bad byte, as from a failing disk: each rank that reads it takes a while
    newest.write_bytes(bytes(data))
    resumed = run(torchrun(*train_cmd(shards, out, "--max_steps", "3", "--ckpt_every", "1", "--resume", "auto")[1:]))
    assert resumed.returncode == 0, resumed.stderr
    # Rank 0 alone scanned the folder (one report, one rename), and both ranks loaded the same earlier file.
    # (Before, both ranks scanned: the slower one found the file renamed under it and crashed.)
    assert resumed.stderr.count("resume: skipping") == 1 and (out / "step-000000002.pt.bad").exists()
    assert f"resume: rank 1 loads {out / 'step-000000001.pt'} (step 1," in resumed.stderr
    assert f"resume: {out / 'step-000000001.pt'} at epoch 0, step 1" in resumed.stdout
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 3


def test_a_rank_that_cannot_read_the_chosen_checkpoint_stops_the_run(shards, two_rank_run, tmp_path):  # noqa: F811
    # Two "nodes" that do not share the run folder: each rank runs in its own folder with the same relative --out.
    # Rank 0 finds a checkpoint in its run/; rank 1's run/ is empty.
    for node in ("node0", "node1"):
        (tmp_path / node / "run").mkdir(parents=True)
    for name in ("step-000000001.pt", "step-000000001.pt.sha256"):
        shutil.copy(two_rank_run / name, tmp_path / "node0" / "run" / name)
    wrapper = tmp_path / "in_node_folder.sh"
    train = REPO / "train.py"
    wrapper.write_text(f'#!/bin/sh\ncd "{tmp_path}/node$LOCAL_RANK" && exec {sys.executable} {train} "$@"\n')
    wrapper.chmod(0o755)
    cmd = torchrun("--no-python", str(wrapper), "--data", str(shards), "--out", "run", *TINY, "--max_steps", "3",
                   "--resume", "auto")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert ("train: error: resume: rank 1 cannot use run/step-000000001.pt, the checkpoint rank 0 chose: "
            "run/step-000000001.pt: checkpoint not found. The run folder (--out) must be on a filesystem that every "
            "node shares") in result.stderr
    assert result.stderr.count("train: error:") == 2  # both ranks stop, with the same line
    assert not list((tmp_path / "node1" / "run").glob("step-*"))  # rank 1 did not train from step 0


def test_resume_does_not_fetch_imagenet_weights_again(shards, tmp_path, monkeypatch):  # noqa: F811
    import torchvision
    from torchvision.models._api import WeightsEnum

    from stenvan.training.trainer import Trainer

    fetched = []

    def download(self, *args, **kwargs):  # stands for torchvision's download of IMAGENET1K_V1
        fetched.append(self)
        return torchvision.models.resnet50().state_dict()

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    args = [*TINY, "--pretrained", "imagenet", "--ckpt_minutes", "0"]
    monkeypatch.setattr(WeightsEnum, "get_state_dict", download)
    trainer = Trainer(load_config(None, args + ["--max_steps", "1"], data=str(shards), out=str(tmp_path / "run")))
    trainer.fit()
    trainer.close()
    assert len(fetched) == 1  # the first run starts from ImageNet
    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="Could not download the ImageNet"):  # offline indeed
        Trainer(load_config(None, args, data=str(shards), out=str(tmp_path / "fresh")))
    trainer = Trainer(load_config(None, args + ["--max_steps", "2"], data=str(shards), out=str(tmp_path / "run")),
                      resume="auto")
    saved = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.fit().global_step == 2
    trainer.close()

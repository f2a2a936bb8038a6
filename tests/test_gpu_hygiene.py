"""GPU hygiene, checked on the CPU: `precision: auto` picks fp16 + GradScaler on GPUs without bf16, the trainer
asks the loader for clips in the training dtype and turns cuDNN's autotuner on, evaluation runs channels_last."""

from __future__ import annotations

import pytest
import torch

from stenvan import amp
from stenvan.config import load_config
from tests.test_train import TINY, shards  # noqa: F401 - the module's shard fixture


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_precision_auto_follows_the_gpu(monkeypatch, capability, expected):
    monkeypatch.setattr(amp, "gpu_compute_capability", lambda device: capability)  # V100, T4, A100, H100
    assert amp.resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert amp.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert amp.resolve_precision("bf16", torch.device("cuda", 0)) == "bf16"  # asked for explicitly: kept


def test_trainer_asks_for_the_training_dtype_and_cudnn_autotuning(shards, tmp_path, monkeypatch):  # noqa: F811
    import stenvan.data
    from stenvan.training.trainer import Trainer

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    asked = {}
    real = stenvan.data.build_train_loader

    def build(*args, **kwargs):
        asked.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(stenvan.data, "build_train_loader", build)
    trainer = Trainer(load_config(None, TINY + ["--precision", "bf16"], data=str(shards), out=str(tmp_path / "run")))
    trainer.close()
    assert asked["dtype"] == torch.bfloat16  # no fp32 clips converted on every step
    assert torch.backends.cudnn.benchmark


def test_evaluation_runs_the_model_in_channels_last(shards):  # noqa: F811
    from stenvan.evaluation.evaluate import extract_split
    from stenvan.models import build_model

    model = build_model("ste_nvan", 4, stripes=2)  # NCHW weights, as load_model_for_eval returns them
    channels_last = []
    model.backbone.layer1[0].register_forward_pre_hook(
        lambda module, args: channels_last.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    extract_split(model, str(shards), "gallery", mode="paper", clip_len=4, height=32, width=16,
                  device=torch.device("cpu"), precision="fp32", loader="torch", workers=1, batch_size=16,
                  progress=False)
    assert channels_last and all(channels_last)
    assert model.backbone.conv1.weight.is_contiguous()  # handed back in the layout it came in

"""Small stenvan checkpoints for the tests of embed.py, search, export and eval --rerank (not a test module).

The model is the real architecture at a small input (T=4, 32x16, STE-NVAN stripes 2) with non-trivial
BatchNorm statistics and non-local BN weights, so the non-local blocks contribute to the features (a fresh block
is the identity) and a wrong layer or preprocessing step cannot hide behind zeros and ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stenvan.checkpoint import write_checkpoint_file
from stenvan.config import TrainConfig
from stenvan.models import build_model

SIZE = {"clip_len": 4, "height": 32, "width": 16}


def tiny_config(arch: str = "ste_nvan") -> TrainConfig:
    return TrainConfig(data="unused", arch=arch, pretrained="none", stripes=2, **SIZE).validate()


def tiny_model(cfg: TrainConfig, num_classes: int, seed: int = 0) -> nn.Module:
    """The model eval.py rebuilds from `cfg` (stenvan.evaluation.evaluate.load_model_for_eval), with lively norms."""
    torch.manual_seed(seed)
    options = {} if cfg.arch == "baseline" else {"attention": cfg.attention}
    if cfg.arch == "ste_nvan":
        options.update(stripes=cfg.stripes, temporal_attention=cfg.temporal_attention)
    model = build_model(cfg.arch, num_classes, stem_relu=cfg.stem_relu, **options)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m is not model.head.bn:
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def write_checkpoint(path: str | Path, model: nn.Module, cfg: TrainConfig, num_classes: int) -> Path:
    """A stenvan checkpoint (what train.py writes, minus optimizer and progress) holding `model`."""
    return write_checkpoint_file({"config": cfg.to_dict(), "num_classes": num_classes,
                                  "model": model.state_dict()}, path)


def tiny_checkpoint(path: str | Path, arch: str = "ste_nvan", num_classes: int = 4, seed: int = 0) -> Path:
    cfg = tiny_config(arch)
    return write_checkpoint(path, tiny_model(cfg, num_classes, seed), cfg, num_classes)

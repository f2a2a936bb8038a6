"""The model a training config describes: where the config becomes `build_model`'s plain arguments (for the
trainer and `stenvan.evaluation.evaluate` alike)."""

from __future__ import annotations

import torch

from stenvan.config import TrainConfig
from stenvan.models.video_net import build_model


def build_model_from_config(cfg: TrainConfig, num_classes: int, pretrained: bool = True) -> torch.nn.Module:
    """The run's model; pretrained=False skips the ImageNet weights (e.g. when a checkpoint replaces them all)."""
    weights = None if (not pretrained or cfg.pretrained == "none") else cfg.pretrained
    options = {"attention": cfg.attention} if cfg.arch != "baseline" else {}
    if cfg.arch == "ste_nvan":  # stripes and temporal attention are STE-NVAN's options only
        options.update(stripes=cfg.stripes, temporal_attention=cfg.temporal_attention)
    return build_model(cfg.arch, num_classes, stem_relu=cfg.stem_relu, pretrained=weights, **options)

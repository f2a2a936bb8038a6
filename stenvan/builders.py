"""The model a config describes, for the trainer and for `stenvan.evaluate` alike (so neither imports the other)."""

from __future__ import annotations

import torch

from stenvan.config import TrainConfig


def build_model_from_config(cfg: TrainConfig, num_classes: int, pretrained: bool = True) -> torch.nn.Module:
    """The run's model; pretrained=False skips the ImageNet weights (e.g. when a checkpoint replaces them all)."""
    from stenvan.models import build_model

    weights = None if (not pretrained or cfg.pretrained == "none") else cfg.pretrained
    options = {"attention": cfg.attention} if cfg.arch != "baseline" else {}
    if cfg.arch == "ste_nvan":  # stripes and temporal attention are STE-NVAN's options only
        options.update(stripes=cfg.stripes, temporal_attention=cfg.temporal_attention)
    return build_model(cfg.arch, num_classes, stem_relu=cfg.stem_relu, pretrained=weights, **options)

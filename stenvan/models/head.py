"""Re-id head (design §3): 3-D average pool -> BNNeck (bias frozen at 0) -> bias-free classifier."""

from __future__ import annotations

import torch
from torch import nn


class ReIDHead(nn.Module):
    """Train mode: (pre-BN clip feature f, logits); eval mode: BN(f), the retrieval feature.

    f feeds the triplet loss, the logits the cross-entropy; initialised as the original (BN weight 1, bias 0
    and not trained; classifier N(0, 0.001)).
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)  # "BNNeck": no shift, so f and BN(f) stay centred alike
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feats: torch.Tensor):
        """feats: (B, T', C, h, w) -> (f, logits) in train mode, BN(f) of shape (B, C) in eval mode."""
        f = feats.mean(dim=(1, 3, 4))  # (B, C): average over (T', h, w), the original's AdaptiveAvgPool3d(1)
        bn = self.bn(f)
        if self.training:
            return f, self.classifier(bn)  # (B, C), (B, num_classes)
        return bn

"""Losses of the paper's recipe: batch-hard triplet on the pre-BN clip feature + cross-entropy on the logits.

Under DDP the triplet loss mines over the **global** batch: features and labels are gathered from every rank
(with gradients), as the original's DataParallel computed it over the whole batch. Every rank then holds the
same triplet loss; the all-gather's backward sums the ranks' gradients for each rank's features and DDP
averages, so the parameter gradient is exactly that of the single-process loss.

All loss arithmetic runs in fp32 with autocast switched off: under bf16 autocast a matmul is cast back to bf16
even when its inputs are fp32, and with realistic features (|f|² ≈ 800, clusters a few units wide) the
distances d = sqrt(|a|² + |b|² - 2 a·b) then lose the small differences d_ap - d_an the loss lives on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stenvan import distributed


def batch_hard_triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float | None = None) -> torch.Tensor:
    """Hardest positive and hardest negative per anchor, Euclidean distance.

    feats (N, D), labels (N,). margin=None: soft margin, log(1 + exp(d_ap - d_an)) (the paper);
    otherwise the hinge max(0, d_ap - d_an + margin).
    """
    with torch.autocast(feats.device.type, enabled=False):  # autocast would run the matmul in bf16 again
        feats = feats.float()
        sq = feats.pow(2).sum(1)
        dist = (sq[:, None] + sq[None, :] - 2 * feats @ feats.t()).clamp_min(1e-12).sqrt()  # (N, N)
        same = labels[:, None] == labels[None, :]
        d_ap = dist.masked_fill(~same, float("-inf")).amax(1)  # the anchor itself (distance ~0) never wins
        d_an = dist.masked_fill(same, float("inf")).amin(1)
        if margin is None:
            return F.softplus(d_ap - d_an).mean()
        return F.relu(d_ap - d_an + margin).mean()


class ReIDLoss(torch.nn.Module):
    """triplet_weight * batch-hard triplet (global batch) + ce_weight * cross-entropy (local batch)."""

    def __init__(self, triplet: str = "soft", margin: float = 0.3, triplet_weight: float = 1.0,
                 ce_weight: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        if triplet not in ("soft", "margin"):
            raise ValueError(f"triplet={triplet!r}; valid values are soft, margin")
        self.margin = None if triplet == "soft" else margin
        self.triplet_weight, self.ce_weight, self.label_smoothing = triplet_weight, ce_weight, label_smoothing

    def forward(self, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # feats (B_local, 2048) pre-BN clip features; logits (B_local, #ids); labels (B_local,)
        all_feats = distributed.all_gather_with_grad(feats)  # (B_global, 2048), rank order = global batch order
        all_labels = distributed.all_gather_with_grad(labels)
        triplet = batch_hard_triplet(all_feats, all_labels, self.margin)
        with torch.autocast(logits.device.type, enabled=False):  # fp32 softmax and sums
            ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            total = self.triplet_weight * triplet + self.ce_weight * ce
        return {"loss": total, "triplet": triplet.detach(), "ce": ce.detach()}

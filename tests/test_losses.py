"""Batch-hard triplet and the combined loss against hand-worked values."""

from __future__ import annotations

import math

import torch

from stenvan.training.losses import ReIDLoss, batch_hard_triplet


def test_batch_hard_triplet_hand_worked():
    # 1-D features: ids 0 at {0, 1}, ids 1 at {3, 7}.
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # hardest positive / negative distances per anchor:
    #   x=0: d_ap=1, d_an=3   x=1: d_ap=1, d_an=2   x=3: d_ap=4, d_an=2   x=7: d_ap=4, d_an=6
    d_ap = torch.tensor([1.0, 1.0, 4.0, 4.0])
    d_an = torch.tensor([3.0, 2.0, 2.0, 6.0])
    soft = torch.log1p(torch.exp(d_ap - d_an)).mean()
    assert torch.allclose(batch_hard_triplet(feats, labels), soft, atol=1e-5)
    hinge = torch.relu(d_ap - d_an + 0.3).mean()  # = (0 + 0 + 2.3 + 0) / 4
    assert math.isclose(float(batch_hard_triplet(feats, labels, margin=0.3)), 2.3 / 4, rel_tol=1e-5)
    assert torch.allclose(batch_hard_triplet(feats, labels, margin=0.3), hinge)


def test_gradient_flows_to_hardest_pairs_only():
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0]], requires_grad=True)
    batch_hard_triplet(feats, torch.tensor([0, 0, 1, 1]), margin=0.3).backward()
    # only anchor x=3 is active: (|x3-x7| - |x3-x1| + 0.3) / 4 -> d/dx3 = (-1 - 1)/4, d/dx7 = d/dx1 = +1/4
    assert torch.allclose(feats.grad.flatten(), torch.tensor([0.0, 0.25, -0.5, 0.25]))


def test_combined_loss_is_weighted_sum():
    torch.manual_seed(0)
    feats, logits = torch.randn(8, 16), torch.randn(8, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = ReIDLoss(triplet_weight=2.0, ce_weight=0.5)(feats, logits, labels)
    expected = 2.0 * batch_hard_triplet(feats, labels) + 0.5 * torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(out["loss"], expected)
    smoothed = ReIDLoss(label_smoothing=0.1)(feats, logits, labels)["ce"]
    assert not torch.allclose(smoothed, out["ce"])

"""The losses keep fp32 precision under autocast: realistic features (|f|² ≈ 800, tight identity clusters) give
the fp32 loss and feature gradients under CPU bf16 autocast, where a bf16 distance matmul would not."""

from __future__ import annotations

import torch

from stenvan.training.losses import ReIDLoss, batch_hard_triplet


def realistic_batch(P=8, K=4, dim=2048, seed=0):
    """Pre-BN clip features as a trained model makes them: non-negative (average-pooled ReLU maps), a shared
    component of |f|² ≈ 800, identity centres ~1.3 apart and clips ~1.4 around their centre, so that some negatives
    come closer than some positives (the hinge has active triplets too)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(dim, generator=g) * 1.08  # E|base|² = dim · 1.08² / 3 ≈ 800
    centres = base + 0.02 * torch.randn(P, dim, generator=g)
    feats = (centres.repeat_interleave(K, 0) + 0.03 * torch.randn(P * K, dim, generator=g)).clamp_min(0)
    labels = torch.arange(P).repeat_interleave(K)
    return feats, labels


def loss_and_grad(fn, feats, autocast: bool):
    x = feats.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x)
    loss.backward()
    return loss.detach().float(), x.grad


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_triplet_and_combined_loss_are_fp32_under_bf16_autocast():
    feats, labels = realistic_batch()
    norms = feats.pow(2).sum(1)
    assert 700 < norms.mean() < 900  # the regime the issue measured
    dist = torch.cdist(feats.double(), feats.double())
    assert dist[labels[:, None] != labels[None, :]].min() < 5  # tight: negatives a few units away
    for margin in (None, 0.3):
        fn = lambda x: batch_hard_triplet(x, labels, margin)  # noqa: E731
        ref_loss, ref_grad = loss_and_grad(fn, feats, autocast=False)
        amp_loss, amp_grad = loss_and_grad(fn, feats, autocast=True)
        assert ref_grad.abs().sum() > 0  # some triplets are active: the comparison is not vacuous
        assert relative(amp_loss, ref_loss) < 1e-3, (margin, amp_loss, ref_loss)
        assert relative(amp_grad, ref_grad) < 1e-3, margin
    # The combined loss (cross-entropy on bf16 logits from the model) too.
    logits = torch.randn(len(labels), 10, generator=torch.Generator().manual_seed(1))
    criterion = ReIDLoss()
    fn = lambda x: criterion(x, logits, labels)["loss"]  # noqa: E731
    ref_loss, ref_grad = loss_and_grad(fn, feats, autocast=False)
    amp_loss, amp_grad = loss_and_grad(fn, feats, autocast=True)
    assert relative(amp_loss, ref_loss) < 1e-3 and relative(amp_grad, ref_grad) < 1e-3

"""The non-local (NL) attention block of NVAN and STE-NVAN (design §3), written once.

Embedded-Gaussian NL: θ, φ, g are 1×1×1 projections C → d = C/2 (with bias); attention = softmax(θᵀφ) over all
keys of a group of frames, **without** the 1/√d scaling (the original's choice; SDPA with `scale=1.0` is exact);
y = attention · g; z = BN(W y) + x, with the BN's weight and bias initialised to 0 so a fresh block is the identity.

One class covers the two token layouts of the original code:
- `stripes=None` (NVAN): every position (t, h, w) of the group's frames is a token;
- `stripes=S` (STE-NVAN spatial reduction): each frame's map is average-pooled into S full-width horizontal
  stripes, the stripes are the tokens, and each stripe's output vector is copied back over its rows.
How many consecutive frames attend together (`group_frames`) is a call argument: the whole clip for NVAN, a pair
for the released STE-NVAN, and T changes through the network.

The block works on the backbone's frame batch (B·T, C, H, W): the projections are 1×1 2-D convs over frames, so
channels_last activations stay channels_last and the token view (B·T, H, W, C) of them is free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_MODES = ("fused", "reference")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> torch.Tensor:
    """softmax(q kᵀ) v for (G, N, d) token groups, unscaled (scale 1, as the original)."""
    if mode == "fused":
        # One head: (G, 1, N, d). SDPA picks flash / memory-efficient / cuDNN kernels on a GPU and its fused
        # kernel on the CPU; none of them materialises the (N, N) attention map.
        y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0)
        return y.squeeze(1)  # (G, N, d)
    if mode == "reference":
        # The original's explicit path: the (G, N, N) map is materialised (4096² per clip at NVAN's layer2).
        attn = torch.softmax(q @ k.transpose(1, 2), dim=-1)  # (G, N, N)
        return attn @ v  # (G, N, d)
    raise ValueError(f"attention={mode!r} is not valid; use one of {', '.join(map(repr, ATTENTION_MODES))}.")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # Keep the activations' layout: a channels_last network must not be turned back to NCHW by the block.
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class NonLocalBlock(nn.Module):
    """Non-local block over groups of consecutive frames; `stripes` switches to stripe tokens.

    `name` (e.g. "layer3.3") only makes error messages say which block failed.
    """

    def __init__(self, channels: int, inter_channels: int | None = None, stripes: int | None = None,
                 attention: str = "fused", name: str = "non_local"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r} is not valid; use one of "
                             f"{', '.join(map(repr, ATTENTION_MODES))}.")
        if stripes is not None and (isinstance(stripes, bool) or not isinstance(stripes, int) or stripes < 1):
            raise ValueError(f"stripes={stripes!r} is not valid; use a positive integer or None (pixel tokens).")
        self.channels = channels
        self.inter_channels = inter_channels or max(channels // 2, 1)
        self.stripes = stripes
        self.attention = attention
        self.name = name
        d = self.inter_channels
        # Conv2d 1×1 on frames = the original's Conv3d 1×1×1 on (B, C, T, H, W); same default init (fan_in = C).
        self.theta = nn.Conv2d(channels, d, kernel_size=1)
        self.phi = nn.Conv2d(channels, d, kernel_size=1)
        self.g = nn.Conv2d(channels, d, kernel_size=1)
        self.out = nn.Conv2d(d, channels, kernel_size=1)  # the original's W[0]
        self.bn = nn.BatchNorm2d(channels)  # the original's W[1]
        # Zero-initialised BN: z = x at the start, so the ImageNet backbone's behaviour is unchanged.
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stripes={self.stripes}, attention={self.attention!r}"

    def forward(self, x: torch.Tensor, group_frames: int) -> torch.Tensor:
        """x: (B·T, C, H, W) with each group's `group_frames` frames consecutive -> same shape and layout."""
        frames, channels, height, width = x.shape
        if group_frames < 1 or frames % group_frames:
            raise ValueError(f"non-local block {self.name}: {frames} frames cannot be split into groups of "
                             f"{group_frames} consecutive frames; the clip length must be a multiple of "
                             f"{group_frames} at this block.")
        if self.stripes is not None:
            if height % self.stripes:
                raise ValueError(f"non-local block {self.name}: stripes={self.stripes} must divide the feature "
                                 f"height {height} here (the input height / 8 at layer2, / 16 at layer3 and "
                                 f"layer4); pass stripes that divide it or change the input height.")
            src = F.avg_pool2d(x, kernel_size=(height // self.stripes, width))  # (B·T, C, S, 1): stripe tokens
        else:
            src = x  # (B·T, C, H, W): pixel tokens
        tok_h, tok_w = src.shape[-2:]
        d = self.inter_channels

        # θ, φ, g as one 1×1 conv: x is read once and the GEMM is 3× wider (the cat of weights is tiny).
        weight = torch.cat([self.theta.weight, self.phi.weight, self.g.weight])  # (3d, C, 1, 1)
        bias = torch.cat([self.theta.bias, self.phi.bias, self.g.bias])  # (3d,)
        qkv = F.conv2d(src, weight, bias)  # (B·T, 3d, h, w)
        # Tokens of a group: frame-major, then row, then column (the original's (t, h, w) flattening order).
        qkv = qkv.permute(0, 2, 3, 1).reshape(frames // group_frames, group_frames * tok_h * tok_w, 3 * d)
        q, k, v = qkv.split(d, dim=-1)  # each (G, N, d), N = group_frames · h · w
        y = attend(q, k, v, self.attention)  # (G, N, d)

        y = y.reshape(frames, tok_h, tok_w, d).permute(0, 3, 1, 2)  # (B·T, d, h, w), channels_last strides
        y = y.contiguous(memory_format=_memory_format(x))
        # BN over the tokens (stripes, not rows): the statistics the original's BatchNorm3d saw.
        y = self.bn(self.out(y))  # (B·T, C, h, w)
        if self.stripes is not None:
            # Each stripe's vector over its H/S rows: (B·T, C, S, 1) -> (B·T, C, H, 1), broadcast over W.
            y = y.repeat_interleave(height // self.stripes, dim=2)
        return x + y  # (B·T, C, H, W)

"""The clip models: ResNet-50 baseline, NVAN and STE-NVAN (design §3), and `build_model`.

One network class, configured by data:
- `nl_positions`: where non-local blocks go, as {stage: [0-based bottleneck indices]}; a block is inserted
  *after* the bottleneck with that index. The default {"layer2": [2, 3], "layer3": [3, 4, 5]} is the original's
  `--non_layers 0 2 3 0` (after the last 2 bottlenecks of layer2 and the last 3 of layer3).
- `temporal_reduction` (STE-NVAN): element-wise max over consecutive frame pairs after layer2 and after layer3.
- `temporal_attention`: "clip" (every block attends over all frames present) or "pair" (within each pair of
  consecutive frames: the released STE-NVAN code).
- `stripes`: stripe tokens in every non-local block (STE-NVAN's spatial reduction), None for pixel tokens.

Shapes below are for B clips of T frames of H×W; frames run as a 2-D batch (B·T, C, h, w) throughout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from stenvan.models.backbone import FEATURE_DIM, LAYER_CHANNELS, LAYER_DEPTHS, LAYERS, ResNet50
from stenvan.models.head import ReIDHead
from stenvan.models.non_local import ATTENTION_MODES, NonLocalBlock
from stenvan.models.pretrained import load_imagenet_backbone

ARCHS = ("baseline", "nvan", "ste_nvan")
TEMPORAL_ATTENTION = ("pair", "clip")
DEFAULT_NL_POSITIONS = {"layer2": (2, 3), "layer3": (3, 4, 5)}  # the original's non_layers 0 2 3 0
DEFAULT_STRIPES = 16  # STE-NVAN's stripes per frame (the original's --stripes 16 16 16 16)
REDUCED_AFTER = ("layer2", "layer3")  # STE-NVAN halves T after these stages: 8 -> 4 -> 2


class VideoReIDNet(nn.Module):
    """(B, T, 3, H, W) clips -> train: (pre-BN feature (B, 2048), logits (B, #ids)); eval: BN feature (B, 2048)."""

    def __init__(self, num_classes: int, *, nl_positions: Mapping[str, tuple[int, ...]], stripes: int | None,
                 temporal_reduction: bool, temporal_attention: str, attention: str, stem_relu: bool):
        super().__init__()
        self.nl_positions = {layer: tuple(idx) for layer, idx in nl_positions.items()}
        self.temporal_reduction = temporal_reduction
        self.temporal_attention = temporal_attention
        self.backbone = ResNet50(last_stride=1, stem_relu=stem_relu)
        # Keys "layer3_3" = the block after layer3's bottleneck 3 (ModuleDict keys cannot contain dots).
        self.non_local = nn.ModuleDict({
            f"{layer}_{i}": NonLocalBlock(LAYER_CHANNELS[layer], stripes=stripes, attention=attention,
                                          name=f"{layer}.{i}")
            for layer in LAYERS for i in self.nl_positions.get(layer, ())
        })
        self.head = ReIDHead(FEATURE_DIM, num_classes)

    def _frames_at(self, clip_len: int) -> dict[str, int]:
        """Frames per clip inside each stage (before its own reduction)."""
        frames, out = clip_len, {}
        for layer in LAYERS:
            out[layer] = frames
            if self.temporal_reduction and layer in REDUCED_AFTER:
                frames //= 2
        return out

    def _group_frames(self, frames: int) -> int:
        # How many consecutive frames attend together at a stage that holds `frames` per clip.
        return frames if self.temporal_attention == "clip" else 2

    def check_clip_length(self, clip_len: int) -> None:
        """Raise ValueError unless clips of `clip_len` frames fit the temporal reductions and attention groups."""
        if clip_len < 1:
            raise ValueError(f"the clip length T must be at least 1, got T={clip_len}.")
        if self.temporal_reduction and clip_len % 4:
            raise ValueError(f"ste_nvan needs a clip length T that is a multiple of 4 (it max-pools frame pairs "
                             f"after layer2 and again after layer3); got T={clip_len}.")
        frames_at = self._frames_at(clip_len)
        for layer, idx in self.nl_positions.items():
            group = self._group_frames(frames_at[layer])
            if idx and frames_at[layer] % group:
                raise ValueError(f"temporal_attention={self.temporal_attention!r} groups frames in pairs, but "
                                 f"{layer} sees {frames_at[layer]} frames per clip for T={clip_len}; use a T "
                                 f"that leaves an even number of frames at every stage with non-local blocks.")

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> frame maps (B, T', 2048, H/16, W/16); T' = T/4 for STE-NVAN, else T."""
        if clips.dim() != 5 or clips.shape[2] != 3:
            raise ValueError(f"expected clips of shape (B, T, 3, H, W), got {tuple(clips.shape)}.")
        batch, clip_len = clips.shape[:2]
        self.check_clip_length(clip_len)
        x = clips.reshape(batch * clip_len, *clips.shape[2:])  # (B·T, 3, H, W)
        x = self.backbone.stem(x)  # (B·T, 64, H/4, W/4)
        frames = clip_len
        for layer in LAYERS:
            for i, bottleneck in enumerate(getattr(self.backbone, layer)):
                x = bottleneck(x)  # (B·t, C, h, w)
                key = f"{layer}_{i}"
                if key in self.non_local:
                    x = self.non_local[key](x, group_frames=self._group_frames(frames))  # same shape
            if self.temporal_reduction and layer in REDUCED_AFTER:
                pairs = x.view(batch * frames // 2, 2, *x.shape[1:])  # (B·t/2, 2, C, h, w): frame pairs
                x = torch.maximum(pairs[:, 0], pairs[:, 1])  # (B·t/2, C, h, w)
                frames //= 2
        return x.view(batch, frames, *x.shape[1:])  # (B, T', 2048, h, w)

    def forward_head(self, feats: torch.Tensor):
        return self.head(feats)

    def forward(self, clips: torch.Tensor):
        return self.forward_head(self.forward_features(clips))


def _bad(option: str, value, valid: str) -> ValueError:
    return ValueError(f"{option}={value!r} is not valid; {valid}.")


def _check_nl_positions(nl_positions) -> dict[str, tuple[int, ...]]:
    if not isinstance(nl_positions, Mapping):
        raise _bad("nl_positions", nl_positions, 'use a dict such as {"layer2": [2, 3], "layer3": [3, 4, 5]} '
                   "(0-based bottleneck indices; a block goes after each)")
    out = {}
    for layer, idx in nl_positions.items():
        if layer not in LAYER_DEPTHS:
            raise _bad("nl_positions", dict(nl_positions), f"its keys must be among {', '.join(LAYERS)}")
        depth = LAYER_DEPTHS[layer]
        if isinstance(idx, (str, bytes)) or not hasattr(idx, "__iter__"):
            raise _bad("nl_positions", dict(nl_positions), f"{layer} needs a list of bottleneck indices")
        idx = list(idx)
        if (any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in idx)
                or len(set(idx)) != len(idx)):
            raise _bad("nl_positions", dict(nl_positions),
                       f"{layer} indices must be distinct integers in 0..{depth - 1} ({depth} bottlenecks)")
        if idx:
            out[layer] = tuple(sorted(idx))
    return out


def build_model(arch: str, num_classes: int, *, attention: str = "fused", stem_relu: bool = False,
                nl_positions: Mapping[str, list[int]] | None = None, stripes: int | None = None,
                temporal_attention: str | None = None,
                pretrained: str | os.PathLike | None = None) -> VideoReIDNet:
    """Build a clip model.

    arch: "baseline" (ResNet-50, frame features averaged), "nvan" (5 NL blocks over the whole clip) or
        "ste_nvan" (NVAN with stripe tokens and pairwise temporal max-pools).
    num_classes: training identities (classifier outputs).
    attention: "fused" (SDPA, scale 1) or "reference" (explicit matmul -> softmax -> matmul, as the original).
    stem_relu: add the ReLU after the stem's BN that the original lacks.
    nl_positions: {stage: [0-based bottleneck indices]}, a block after each; default: the original's five.
    stripes: stripe tokens per frame (ste_nvan default 16; nvan default None = pixel tokens).
    temporal_attention: ste_nvan only: "pair" (default, as released) or "clip" (the paper's figure).
    pretrained: None, "imagenet" (torchvision IMAGENET1K_V1) or the path of a ResNet-50 state dict.
    """
    if arch not in ARCHS:
        raise _bad("arch", arch, f"use one of {', '.join(map(repr, ARCHS))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise _bad("num_classes", num_classes, "use a positive integer (the number of training identities)")
    if attention not in ATTENTION_MODES:
        raise _bad("attention", attention, f"use one of {', '.join(map(repr, ATTENTION_MODES))}")
    if not isinstance(stem_relu, bool):
        raise _bad("stem_relu", stem_relu, "use True or False")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise _bad("pretrained", pretrained, "use None, 'imagenet' or the path of a ResNet-50 state dict")

    if arch == "baseline":
        for option, value in (("nl_positions", nl_positions), ("stripes", stripes),
                              ("temporal_attention", temporal_attention)):
            if value is not None:
                raise _bad(option, value, "the baseline has no non-local blocks, leave it None")
        positions = {}
    else:
        positions = _check_nl_positions(DEFAULT_NL_POSITIONS if nl_positions is None else nl_positions)
    if arch == "ste_nvan":
        stripes = DEFAULT_STRIPES if stripes is None else stripes
        temporal_attention = temporal_attention or "pair"
        if temporal_attention not in TEMPORAL_ATTENTION:
            raise _bad("temporal_attention", temporal_attention,
                       f"use one of {', '.join(map(repr, TEMPORAL_ATTENTION))}")
    elif arch == "nvan" and temporal_attention is not None:
        raise _bad("temporal_attention", temporal_attention,
                   "it applies to ste_nvan only (NVAN attends over the whole clip); leave it None")
    if stripes is not None and (isinstance(stripes, bool) or not isinstance(stripes, int) or stripes < 1):
        raise _bad("stripes", stripes, "use a positive integer that divides the feature heights (H/8 at "
                   "layer2, H/16 at layer3), or None for pixel tokens")

    model = VideoReIDNet(num_classes, nl_positions=positions, stripes=stripes,
                         temporal_reduction=arch == "ste_nvan", temporal_attention=temporal_attention or "clip",
                         attention=attention, stem_relu=stem_relu)
    if pretrained is not None:
        load_imagenet_backbone(model.backbone, pretrained)
    return model

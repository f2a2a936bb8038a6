"""Import the checkpoints released by the original project (jackie840129/STE-NVAN): NVAN.pth, STE_NVAN.pth,
R50_baseline_mean.pth. The full mapping and what was verified are in docs/checkpoint_mapping.md.

Those files are `nn.DataParallel(CNN(...)).state_dict()`, hence the `module.` prefix. Renames:

    module.features.backbone.<torchvision ResNet-50 name>        -> backbone.<same name>
    module.features.backbone.NL_<s>.<j>.{theta,phi,g}.<p>        -> non_local.layer<s>_<i>.{theta,phi,g}.<p>
    module.features.backbone.NL_<s>.<j>.W.0.<p>                  -> non_local.layer<s>_<i>.out.<p>
    module.features.backbone.NL_<s>.<j>.W.1.<p>                  -> non_local.layer<s>_<i>.bn.<p>
    module.bottleneck.<p>                                        -> head.bn.<p>
    module.classifier.weight                                     -> head.classifier.weight

The original puts the n blocks of stage s after its last n bottlenecks (`NL_s_idx = sorted(depth - (j + 1))`),
so block j sits after bottleneck i = depth - n + j. Their 1×1×1 Conv3d weights (d, C, 1, 1, 1) become our 1×1
Conv2d weights (d, C, 1, 1); everything else keeps its shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from stenvan.models.backbone import LAYER_DEPTHS
from stenvan.models.video_net import ARCHS, VideoReIDNet, build_model

_NL_KEY = re.compile(r"^features\.backbone\.NL_([1-4])\.(\d+)\.(theta|phi|g|W\.0|W\.1)\.(\w+)$")
_NL_PART = {"theta": "theta", "phi": "phi", "g": "g", "W.0": "out", "W.1": "bn"}
_HEAD = {"bottleneck.": "head.bn.", "classifier.": "head.classifier."}
_BACKBONE = re.compile(r"^features\.backbone\.((?:conv1|bn1)\.\w+|layer[1-4]\.\d+\.[\w.]+)$")


def original_nl_positions(counts: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """The original's placement: n blocks in a stage go after its last n bottlenecks (0-based indices)."""
    return {layer: tuple(range(LAYER_DEPTHS[layer] - n, LAYER_DEPTHS[layer])) for layer, n in counts.items() if n}


def _shorten(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor], arch: str) -> tuple[dict, dict]:
    """Rename an original STE-NVAN state dict to ours.

    Returns (new_state_dict, report); report = {"stripped_prefix", "renamed" {old: new}, "reshaped" [new keys],
    "num_classes", "nl_positions"}, the last two being what `build_model` needs to receive the weights.
    Raises ValueError on keys it does not know or a checkpoint that does not match `arch`.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not valid; use one of {', '.join(map(repr, ARCHS))}.")
    keys = list(state_dict)
    prefixed = [k.startswith("module.") for k in keys]
    if any(prefixed) and not all(prefixed):
        raise ValueError("the state dict mixes keys with and without the DataParallel 'module.' prefix.")
    prefix = "module." if keys and all(prefixed) else ""

    # Pass 1: how many NL blocks each stage has (NL_<s>.<j>), to place them.
    counts: dict[str, int] = {}
    for key in keys:
        match = _NL_KEY.match(key[len(prefix):])
        if match:
            layer = f"layer{match[1]}"
            counts[layer] = max(counts.get(layer, 0), int(match[2]) + 1)
    if arch == "baseline" and counts:
        raise ValueError(f"arch='baseline' but the checkpoint holds non-local blocks in {_shorten(counts)}: it is "
                         f"an NVAN or STE-NVAN checkpoint.")
    if arch != "baseline" and not counts:
        raise ValueError(f"arch={arch!r} but the checkpoint holds no non-local blocks (NL_<s>.<j>.*): it looks "
                         f"like the baseline (R50_baseline_mean.pth).")
    positions = original_nl_positions(counts)

    # Pass 2: rename (and reshape the Conv3d weights).
    new_state, renamed, reshaped, unknown = {}, {}, [], []
    for key in keys:
        name, value = key[len(prefix):], state_dict[key]
        match = _NL_KEY.match(name)
        if match:
            layer = f"layer{match[1]}"
            i = positions[layer][int(match[2])]
            new = f"non_local.{layer}_{i}.{_NL_PART[match[3]]}.{match[4]}"
            if value.dim() == 5:
                value = value.reshape(value.shape[:2] + (1, 1))  # Conv3d (d, C, 1, 1, 1) -> Conv2d (d, C, 1, 1)
                reshaped.append(new)
        elif _BACKBONE.match(name):
            new = "backbone." + name[len("features.backbone."):]
        elif any(name.startswith(old) for old in _HEAD):
            old = next(old for old in _HEAD if name.startswith(old))
            new = _HEAD[old] + name[len(old):]
        else:
            unknown.append(key)
            continue
        new_state[new] = value
        renamed[key] = new
    if unknown:
        raise ValueError(f"the checkpoint has keys the original STE-NVAN models do not: {_shorten(unknown)}.")
    if "head.classifier.weight" not in new_state:
        raise ValueError("the checkpoint has no classifier weight ('classifier.weight'); is it an original "
                         "STE-NVAN checkpoint?")
    report = {"stripped_prefix": prefix, "renamed": renamed, "reshaped": reshaped,
              "num_classes": int(new_state["head.classifier.weight"].shape[0]), "nl_positions": positions}
    return new_state, report


def load_original_checkpoint(checkpoint: str | os.PathLike | Mapping, arch: str, **options) -> VideoReIDNet:
    """Build `arch` and load an original checkpoint (a path or a state dict) into it with strict=True.

    `options` go to build_model (e.g. attention="fused"); leave stem_relu False and, for ste_nvan, stripes 16:
    the published models were trained that way. For the list of renames, call convert_original_state_dict.
    """
    if isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    new_state, report = convert_original_state_dict(state, arch)
    positions = report["nl_positions"] or None  # None: the baseline takes no nl_positions
    model = build_model(arch, report["num_classes"], nl_positions=positions, **options)
    model.load_state_dict(new_state, strict=True)
    return model

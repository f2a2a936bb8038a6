"""ImageNet initialisation of the backbone: torchvision's IMAGENET1K_V1 ResNet-50 (as the original), or a file.

`pretrained` is "imagenet" (torchvision's weights API: downloads once into the torch hub cache), a path to a
torchvision ResNet-50 state dict (e.g. resnet50-0676ba61.pth copied from a connected machine), or None.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from stenvan.errors import torch_load_error

IMAGENET_FILE = "resnet50-0676ba61.pth"  # the file behind ResNet50_Weights.IMAGENET1K_V1


def _shorten(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def imagenet_state_dict(pretrained: str | os.PathLike) -> tuple[dict, str]:
    """The ResNet-50 state dict named by `pretrained` and a description of its source."""
    if pretrained == "imagenet":
        from torchvision.models import ResNet50_Weights

        weights = ResNet50_Weights.IMAGENET1K_V1
        try:
            return weights.get_state_dict(progress=False, check_hash=True), f"torchvision {weights}"
        except OSError as err:  # URLError and socket errors are OSErrors: offline, proxy, DNS
            raise RuntimeError(
                f"Could not download the ImageNet ResNet-50 weights ({err}). On a machine with internet access, "
                f"download {weights.url} ({IMAGENET_FILE}), copy it here and pass "
                f"pretrained='/path/to/{IMAGENET_FILE}', or put it in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'} where torchvision looks first."
            ) from err
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained={str(pretrained)!r} is neither 'imagenet' nor an existing file; pass "
                                f"'imagenet', None, or the path of a torchvision ResNet-50 state dict "
                                f"({IMAGENET_FILE}).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a truncated, foreign or unsafe file
        raise ValueError(torch_load_error(path, err, "a PyTorch state dict", f"pass a torchvision ResNet-50 state "
                                          f"dict ({IMAGENET_FILE}) from a trusted source")) from None


def load_imagenet_backbone(backbone: nn.Module, pretrained: str | os.PathLike) -> None:
    """Copy ImageNet weights into `backbone` (strict: every key present, nothing left over, same shapes)."""
    state, source = imagenet_state_dict(pretrained)
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a ResNet-50 state dict.")
    # ImageNet's 1000-way classifier has no counterpart here; every other key must match exactly.
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict().keys()
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{source} is not a torchvision ResNet-50 state dict: missing keys "
                         f"[{_shorten(missing)}]; unexpected keys [{_shorten(unexpected)}].")
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:  # same names, wrong shapes (another depth or width)
        raise ValueError(f"{source} does not fit a ResNet-50: {err}") from err
